//! Tasks: the jigsaw generator and scorer, synthetic prior-knowledge suites, JSONL datasets,
//! and the word-level vocabulary of the embedded `tiny` preset.
//!
//! Everything generated here is a pure function of (seed, index): sample i of a split is the
//! same bytes on every run and machine, so runs can be compared and resumed.

pub mod dataset;
pub mod draw;
pub mod jigsaw;
pub mod reward;
pub mod suites;
pub mod vocab;

use crate::Rng;

/// Side in pixels of the tiny preset's images: with 14-pixel patches and a 2x2 merge, a 56x56
/// image is a 4x4 patch grid, i.e. 4 image tokens; a 2x2 jigsaw piece is one token.
pub const TINY_IMAGE_SIZE: u32 = 56;

/// Which half of a task's data: training samples, or the held-out samples measured during
/// training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

/// 64-bit FNV-1a: a stable hash (std's hashers may change between Rust releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for &byte in bytes {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Seed of a named stream, e.g. `stream_seed("colour/train")`.
pub fn stream_seed(name: &str) -> u64 {
    fnv1a(name.as_bytes())
}

/// The generator for sample `index` of the stream `seed`: a pure function of the two, so
/// sample i can be drawn without drawing samples 0..i.
pub fn sample_rng(seed: u64, index: u64) -> Rng {
    // Two SplitMix rounds mix seed and index; adjacent indices give unrelated streams.
    let key = Rng::new(seed).next_u64();
    let mut mixed = Rng::new(key ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    Rng::new(mixed.next_u64())
}
