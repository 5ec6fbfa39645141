//! A task wrapper for trainer tests, shared by tests/train.rs and tests/cuda_train.rs
//! (`#[path]`-included where used, so other test binaries do not carry it unused).

use tessera::rl::data::Example;
use tessera::rl::task::{Scored, Split, Task};

/// Rewards the length of the completion (so a random model gets a GRPO signal); with
/// `all_correct`, every completion also counts as correct (the export receives every rollout).
pub struct ByLength {
    inner: Box<dyn Task>,
    all_correct: bool,
}

pub fn by_length(inner: Box<dyn Task>, all_correct: bool) -> Box<dyn Task> {
    Box::new(ByLength { inner, all_correct })
}

impl Task for ByLength {
    fn name(&self) -> String {
        "by-length".into()
    }
    fn len(&self, s: Split) -> Option<usize> {
        self.inner.len(s)
    }
    fn example(&self, s: Split, i: u64) -> tessera::Result<Example> {
        self.inner.example(s, i)
    }
    fn score(&self, _: Split, _: u64, completion: &str) -> tessera::Result<Scored> {
        Ok(Scored {
            reward: completion.len() as f64,
            correct: self.all_correct,
        })
    }
}
