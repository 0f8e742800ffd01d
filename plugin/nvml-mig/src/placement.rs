//! Choosing where each GPU instance of a layout goes, before the GPU is touched.
//!
//! # Policy
//!
//! nvidia-mig-parted (`pkg/mig/config/config.go`, `SetMigConfig`) lets the driver place each GPU instance
//! (`nvmlDeviceCreateGpuInstance`, no placement) and, when a creation fails because an earlier instance sits
//! where a later one needed to go, clears the GPU and retries with the next permutation of the profile list
//! (`iteratePermutationsUntilSuccess`), clearing again if every order fails. That costs real create/destroy
//! calls per attempt and its result depends on the driver's own placement choice.
//!
//! Here the whole layout is placed **on paper** first, from the table NVML gives
//! (`nvmlDeviceGetGpuInstancePossiblePlacements_v2`, which lists every placement of a profile whatever is
//! already created), and only a layout that fits is ever created, each instance at its chosen placement
//! (`nvmlDeviceCreateGpuInstanceWithPlacement`):
//!
//! 1. instances are placed largest first (by the memory slices a placement of the profile spans, then by
//!    compute slices), template position breaking ties, so big instances take the few places they may use
//!    (an A100's 4g and 7g profiles have one placement, its 3g two) before small ones scatter;
//! 2. each takes the **first** placement, in NVML's order, that overlaps no instance already placed;
//! 3. if some instance finds none, the search backtracks to the previous instance's next placement (a
//!    complete depth-first search: at most 7 instances of at most 8 placements on today's GPUs).
//!
//! The result is deterministic for a given table and layout, and a layout is refused as impossible only if
//! no assignment of non-overlapping placements exists at all.

use crate::profile::Placement;

/// One instance to place: its compute slices and the placements NVML allows for its profile, in NVML's order.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// compute slices of the profile (second sort key)
    pub slices: u32,
    /// the profile's possible placements, as NVML lists them
    pub placements: &'a [Placement],
}

/// Chooses one placement per request (same order as `requests`), no two overlapping; `None` if impossible.
pub fn plan(requests: &[Request<'_>]) -> Option<Vec<Placement>> {
    let span = |r: &Request<'_>| r.placements.iter().map(|p| p.size).max().unwrap_or(0);
    let mut order: Vec<usize> = (0..requests.len()).collect();
    // stable: equal keys keep template order
    order.sort_by(|&a, &b| {
        let (ra, rb) = (&requests[a], &requests[b]);
        span(rb).cmp(&span(ra)).then(rb.slices.cmp(&ra.slices))
    });
    let mut chosen: Vec<Option<Placement>> = vec![None; requests.len()];
    if search(requests, &order, 0, &mut chosen) {
        chosen.into_iter().collect()
    } else {
        None
    }
}

fn search(
    requests: &[Request<'_>],
    order: &[usize],
    depth: usize,
    chosen: &mut [Option<Placement>],
) -> bool {
    let Some(&which) = order.get(depth) else {
        return true;
    };
    for &candidate in requests[which].placements {
        let free = order[..depth]
            .iter()
            .filter_map(|&i| chosen[i])
            .all(|taken| !taken.overlaps(candidate));
        if free {
            chosen[which] = Some(candidate);
            if search(requests, order, depth + 1, chosen) {
                return true;
            }
            chosen[which] = None;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(start: u32, size: u32) -> Placement {
        Placement { start, size }
    }

    /// The A100 80GB's placements (nvidia-smi mig -lgipp): memory slices 0..8.
    fn a100() -> [(u32, Vec<Placement>); 5] {
        [
            (1, (0..7).map(|s| p(s, 1)).collect()), // 1g.10gb
            (2, vec![p(0, 2), p(2, 2), p(4, 2)]),   // 2g.20gb
            (3, vec![p(0, 4), p(4, 4)]),            // 3g.40gb
            (4, vec![p(0, 4)]),                     // 4g.40gb
            (7, vec![p(0, 8)]),                     // 7g.80gb
        ]
    }

    fn req(table: &[(u32, Vec<Placement>)], slices: u32) -> Request<'_> {
        let (s, placements) = table
            .iter()
            .find(|(s, _)| *s == slices)
            .expect("profile in table");
        Request {
            slices: *s,
            placements,
        }
    }

    fn plan_of(slices: &[u32]) -> Option<Vec<Placement>> {
        let table = a100();
        let requests: Vec<_> = slices.iter().map(|&s| req(&table, s)).collect();
        plan(&requests)
    }

    #[test]
    fn seven_small_instances_fill_slices_in_nvml_order() {
        let got = plan_of(&[1; 7]).expect("fits");
        assert_eq!(got, (0..7).map(|s| p(s, 1)).collect::<Vec<_>>());
    }

    #[test]
    fn two_3g_take_both_halves_in_template_order() {
        assert_eq!(plan_of(&[3, 3]), Some(vec![p(0, 4), p(4, 4)]));
    }

    #[test]
    fn whole_gpu() {
        assert_eq!(plan_of(&[7]), Some(vec![p(0, 8)]));
        assert_eq!(plan_of(&[7, 1]), None);
    }

    #[test]
    fn small_first_in_template_still_leaves_room_for_the_4g() {
        // 1g before 4g in the template: first fit in template order would put the 1g at 0 and block the
        // 4g's only placement; largest first does not.
        assert_eq!(plan_of(&[1, 2, 4]), Some(vec![p(6, 1), p(4, 2), p(0, 4)]));
    }

    #[test]
    fn backtracks_when_the_first_fit_of_a_big_instance_strands_small_ones() {
        // 3g first fit at 0 leaves 4..8: 2g at 4, 1g at 6, and no room for the second 1g (1g placements
        // stop at 6). Backtracking moves the 3g to 4.
        let got = plan_of(&[3, 2, 1, 1]).expect("fits");
        assert_eq!(got, vec![p(4, 4), p(0, 2), p(2, 1), p(3, 1)]);
        for (i, a) in got.iter().enumerate() {
            for b in &got[i + 1..] {
                assert!(!a.overlaps(*b), "{a} overlaps {b}");
            }
        }
    }

    #[test]
    fn impossible_layouts_are_refused() {
        assert_eq!(plan_of(&[1; 8]), None);
        assert_eq!(plan_of(&[3, 3, 1]), None);
        assert_eq!(plan_of(&[4, 4]), None);
        assert_eq!(plan_of(&[2, 2, 2, 2]), None);
    }

    #[test]
    fn empty_layout_is_trivially_placed() {
        assert_eq!(plan_of(&[]), Some(vec![]));
    }

    #[test]
    fn a_profile_without_placements_cannot_be_placed() {
        let none: Vec<Placement> = vec![];
        assert_eq!(
            plan(&[Request {
                slices: 1,
                placements: &none
            }]),
            None
        );
    }
}
