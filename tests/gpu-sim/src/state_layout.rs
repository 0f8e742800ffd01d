//! The sizes and byte readers shared by the views of the fakes' shared state files ([`crate::SimNode`]'s
//! CUDA state, [`crate::timeline`]), kept apart so those views do not import each other.

/// The most `[gpu]` sections a node file may have.
pub const MAX_GPUS: usize = 128;

/// The little-endian `u32` at byte `at`.
pub(crate) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// The little-endian `u64` at byte `at`.
pub(crate) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}
