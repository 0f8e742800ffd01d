//! The part of HTTP/2 that both sides of the `:authority` problem write by hand: the frame header (RFC 9113
//! §4.1) with the frame types, flags and settings they look at, and the two HPACK primitives (RFC 7541 §5)
//! they encode with. The agent's adapter (`plugin/src/kubelet/authority.rs`) reads client frames and
//! re-encodes header blocks h2 would refuse; the fake kubelet (`tests/harness/src/kubelet/authority.rs`)
//! writes each `:authority` form onto the wire. HPACK decoding stays with `loona-hpack` on both sides.
//!
//! No allocation of its own, no dependency, nothing that panics on input.

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The length of a frame header.
pub const FRAME_HEAD_LEN: usize = 9;

/// Frame type HEADERS.
pub const HEADERS: u8 = 0x1;
/// Frame type SETTINGS.
pub const SETTINGS: u8 = 0x4;
/// Frame type PUSH_PROMISE.
pub const PUSH_PROMISE: u8 = 0x5;
/// Frame type CONTINUATION.
pub const CONTINUATION: u8 = 0x9;

/// Flag END_STREAM (DATA, HEADERS).
pub const END_STREAM: u8 = 0x1;
/// Flag ACK (SETTINGS, PING).
pub const ACK: u8 = 0x1;
/// Flag END_HEADERS (HEADERS, CONTINUATION, PUSH_PROMISE).
pub const END_HEADERS: u8 = 0x4;
/// Flag PADDED (DATA, HEADERS, PUSH_PROMISE).
pub const PADDED: u8 = 0x8;
/// Flag PRIORITY (HEADERS).
pub const PRIORITY: u8 = 0x20;

/// Setting SETTINGS_HEADER_TABLE_SIZE.
pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
/// Setting SETTINGS_MAX_FRAME_SIZE.
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// The protocol default of SETTINGS_HEADER_TABLE_SIZE, in force until a peer announces otherwise.
pub const DEFAULT_HEADER_TABLE_SIZE: usize = 4096;
/// The protocol default of SETTINGS_MAX_FRAME_SIZE (also the smallest maximum a peer may announce).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 16_384;

/// A frame's 9-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// The payload length (24 bits).
    pub len: usize,
    /// The frame type.
    pub kind: u8,
    /// The flags.
    pub flags: u8,
    /// The stream identifier, the reserved bit cleared.
    pub stream: u32,
}

impl FrameHead {
    /// The header at the start of `b`, or `None` when `b` is shorter than [`FRAME_HEAD_LEN`].
    #[inline]
    pub fn read(b: &[u8]) -> Option<Self> {
        let h: &[u8; FRAME_HEAD_LEN] = b.get(..FRAME_HEAD_LEN)?.try_into().ok()?;
        Some(Self::from_bytes(h))
    }

    /// The header at the start of `b`.
    ///
    /// # Panics
    /// When `b` is shorter than [`FRAME_HEAD_LEN`]; [`FrameHead::read`] does not.
    #[inline]
    pub fn parse(b: &[u8]) -> Self {
        Self::from_bytes(&[b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8]])
    }

    /// The header `h`.
    #[inline]
    pub fn from_bytes(h: &[u8; FRAME_HEAD_LEN]) -> Self {
        Self {
            len: usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]),
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        }
    }

    /// The header's bytes; `len` is written modulo 2^24 (callers keep frames within the peer's limit).
    #[inline]
    pub fn encode(&self) -> [u8; FRAME_HEAD_LEN] {
        let len = self.len;
        let s = self.stream.to_be_bytes();
        [
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            self.kind,
            self.flags,
            s[0],
            s[1],
            s[2],
            s[3],
        ]
    }
}

/// The bytes of a frame header: `len`, `kind`, `flags`, `stream`.
#[inline]
pub fn frame_head(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; FRAME_HEAD_LEN] {
    FrameHead {
        len,
        kind,
        flags,
        stream,
    }
    .encode()
}

/// HPACK's integer with an `prefix`-bit prefix (1 to 8) after the representation's `bits` (RFC 7541 §5.1).
#[inline]
pub fn encode_integer(out: &mut Vec<u8>, value: usize, prefix: u8, bits: u8) {
    let max = (1usize << prefix.clamp(1, 8)) - 1;
    if value < max {
        out.push(bits | value as u8);
        return;
    }
    out.push(bits | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// HPACK's string literal, without Huffman coding (RFC 7541 §5.2).
#[inline]
pub fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_integer(out, s.len(), 7, 0);
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn integers_match_loona_hpack_at_every_prefix_and_boundary() {
        // Around every prefix's maximum and each continuation byte's boundary, and far beyond.
        let mut values: Vec<usize> = (0..=300).collect();
        values.extend([
            1337,
            4096,
            16_383,
            16_384,
            1 << 20,
            1 << 24,
            usize::MAX >> 1,
        ]);
        for prefix in 1..=8u8 {
            for bits in [0u8, 0x80, 0x40, 0x20, 0x10] {
                // The representation's bits sit above the prefix.
                let bits = if prefix == 8 {
                    0
                } else {
                    bits & !((1u8 << prefix) - 1)
                };
                for &v in &values {
                    let mut ours = Vec::new();
                    encode_integer(&mut ours, v, prefix, bits);
                    let mut theirs = Vec::new();
                    loona_hpack::encoder::encode_integer_into(v, prefix, bits, &mut theirs)
                        .unwrap();
                    assert_eq!(
                        ours, theirs,
                        "{v} with a {prefix}-bit prefix after {bits:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn strings_decode_with_loona_hpack() {
        let long = vec![b'x'; 300];
        for value in [
            &b""[..],
            b"localhost",
            b"/var/lib/kubelet/device-plugins/a.sock",
            &long,
        ] {
            let mut block = Vec::new();
            // A literal without indexing, the name from the static table (:authority, index 1).
            encode_integer(&mut block, 1, 4, 0x00);
            encode_string(&mut block, value);
            let fields = loona_hpack::Decoder::new().decode(&block).unwrap();
            assert_eq!(fields, vec![(b":authority".to_vec(), value.to_vec())]);
        }
    }

    #[test]
    fn a_frame_head_round_trips_and_drops_the_reserved_bit() {
        let head = FrameHead {
            len: 0x01_02_03,
            kind: CONTINUATION,
            flags: END_HEADERS,
            stream: 0x7fff_fffd,
        };
        let bytes = head.encode();
        assert_eq!(bytes, [1, 2, 3, 9, 4, 0x7f, 0xff, 0xff, 0xfd]);
        assert_eq!(FrameHead::read(&bytes), Some(head));
        assert_eq!(FrameHead::parse(&bytes), head);
        let mut reserved = bytes;
        reserved[5] |= 0x80;
        assert_eq!(FrameHead::from_bytes(&reserved), head);
        assert_eq!(FrameHead::read(&bytes[..8]), None);
        assert_eq!(frame_head(0, SETTINGS, ACK, 0), [0, 0, 0, 4, 1, 0, 0, 0, 0]);
    }
}
