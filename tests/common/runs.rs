//! Small trainer runs for tests/train.rs and tests/cuda_train.rs (`#[path]`-included where
//! used, so other test binaries do not carry them unused): a run folder, the tiny preset's
//! config, the metrics a run wrote, and a task that rewards length.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tessera::rl::config::TrainConfig;
use tessera::rl::data::Example;
use tessera::rl::task::{Scored, Split, Task};

/// An emptied folder `NAME` for a run, under target/ (CARGO_TARGET_TMPDIR), not the system
/// temp folder; one folder per test, emptied when the test starts again (a failed run stays
/// there for inspection).
pub fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A small run of the tiny preset from random weights.
pub fn config(out: &Path, train: &str, steps: u64) -> TrainConfig {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    TrainConfig::load(
        None,
        &[
            format!("out=\"{}\"", out.display()),
            format!("model.dir=\"{}\"", model.display()),
            "model.init_seed=3".into(),
            format!("data.train=\"{train}\""),
            format!("train.steps={steps}"),
            "train.batch_size=4".into(),
            "train.progress=false".into(),
            "train.log_every=0".into(),
            "grpo.prompts_per_step=2".into(),
            "grpo.group_size=3".into(),
            "grpo.max_new_tokens=5".into(),
            "optim.lr=3e-3".into(),
        ],
    )
    .unwrap()
}

/// The lines of RUN/metrics.jsonl.
pub fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e}", run.join("metrics.jsonl").display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

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
