//! What a trainer needs from a task: examples by (split, index), and a reward for a completion.

use crate::rl::data::Example;
use crate::Result;

pub use crate::tasks::Split;

/// A completion's score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// The (weighted) reward GRPO maximises.
    pub reward: f64,
    /// The whole answer is right (what accuracy counts and rollout export keeps).
    pub correct: bool,
}

pub trait Task: Send + Sync {
    /// A short name for metrics and reports, e.g. "colour" or "jigsaw-2x2".
    fn name(&self) -> String;
    /// Number of examples in a split; `None` for a procedural task (any index is valid).
    fn len(&self, split: Split) -> Option<usize>;
    /// Example `index` of `split`, the same on every call and every machine.
    fn example(&self, split: Split, index: u64) -> Result<Example>;
    /// Scores the decoded completion (special tokens removed) for example `index` of `split`.
    fn score(&self, split: Split, index: u64, completion: &str) -> Result<Scored>;
}
