//! Training checkpoints that survive interruption.
//!
//! ```text
//! RUN/checkpoints/step-000120/   config.json, model.safetensors   (a model dir transformers loads)
//!                                tokenizer.json                   (when the run has one)
//!                                optimizer.safetensors            (AdamW moments by parameter name)
//!                                trainer_state.json               (step, data position, RNG state)
//! RUN/checkpoints/latest         "step-000120"
//! ```
//!
//! A checkpoint is written into `.tmp-step-N/` (every file fsynced), renamed to `step-N/`,
//! and only then named in `latest` (itself replaced by an fsynced rename). A kill at any moment
//! leaves the previous checkpoint complete and `latest` pointing at a complete directory.

use crate::nn::Params;
use crate::optim::{AdamW, AdamWParamState, AdamWState};
use crate::qwen2_5_vl::weights::save_model_dir;
use crate::{DType, Error, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Everything besides weights and optimiser moments that an exact resume needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimiser steps taken.
    pub step: u64,
    /// Examples (SFT) or prompts (GRPO) consumed from the training data.
    pub data_position: u64,
    /// State of the trainer's random stream (sampling, shuffles).
    pub rng_state: u64,
    /// "sft" or "grpo".
    pub kind: String,
    /// The last logged metrics, for a human looking at the checkpoint.
    #[serde(default)]
    pub last_metrics: serde_json::Value,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::file(path, format!("{what}: {e}"))
}

/// Writes `bytes` to `path` through a fsynced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    {
        let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, "cannot create", e))?;
        f.write_all(bytes)
            .map_err(|e| io_err(&tmp, "cannot write", e))?;
        f.sync_all().map_err(|e| io_err(&tmp, "fsync failed", e))?;
    }
    fs::rename(&tmp, path).map_err(|e| io_err(path, "cannot rename into place", e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

fn sync_dir(dir: &Path) {
    // Best effort: directories cannot be fsynced on every platform.
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(path, "fsync failed", e))
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// What a checkpoint holds.
pub struct Checkpoint<'a> {
    pub config_json: &'a serde_json::Value,
    pub params: &'a Params,
    pub optimizer: &'a AdamW,
    pub state: &'a TrainerState,
    pub tokenizer: Option<&'a Path>,
}

/// Writes checkpoint `ck` under `run/checkpoints/` and points `latest` at it; keeps the newest
/// `keep` checkpoints (0 = all). Returns the checkpoint's directory.
pub fn save(run: &Path, ck: &Checkpoint, keep: usize) -> Result<PathBuf> {
    let root = run.join("checkpoints");
    fs::create_dir_all(&root).map_err(|e| io_err(&root, "cannot create", e))?;
    let name = step_dir_name(ck.state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, "cannot remove stale", e))?;
    }
    save_model_dir(&tmp, ck.config_json, ck.params, DType::F32)?;
    sync_file(&tmp.join("config.json"))?;
    if let Some(t) = ck.tokenizer {
        let dst = tmp.join("tokenizer.json");
        fs::copy(t, &dst).map_err(|e| io_err(t, "cannot copy the tokenizer", e))?;
        sync_file(&dst)?;
    }
    save_optimizer(&tmp.join("optimizer.safetensors"), ck.params, ck.optimizer)?;
    let state = serde_json::to_vec_pretty(ck.state).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&tmp.join("trainer_state.json"), &state)?;
    sync_dir(&tmp);
    let dst = root.join(&name);
    if dst.exists() {
        fs::remove_dir_all(&dst).map_err(|e| io_err(&dst, "cannot replace", e))?;
    }
    fs::rename(&tmp, &dst).map_err(|e| io_err(&dst, "cannot rename into place", e))?;
    sync_dir(&root);
    write_atomic(&root.join("latest"), name.as_bytes())?;
    if keep > 0 {
        let mut all = list(&root)?;
        all.sort();
        let n = all.len();
        for (_, old) in all.into_iter().take(n.saturating_sub(keep)) {
            if old != dst {
                fs::remove_dir_all(&old).map_err(|e| io_err(&old, "cannot remove", e))?;
            }
        }
    }
    Ok(dst)
}

/// Complete checkpoints (those with a trainer_state.json) under `root`, as (step, dir).
fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(_) => return Ok(out),
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join("trainer_state.json").exists() {
                out.push((step, e.path()));
            }
        }
    }
    Ok(out)
}

/// The directory of the newest complete checkpoint of a run, if any: the one `latest` names,
/// or (if `latest` is missing or names a directory that is gone) the highest step on disk.
pub fn latest(run: &Path) -> Result<Option<PathBuf>> {
    let root = run.join("checkpoints");
    if let Ok(name) = fs::read_to_string(root.join("latest")) {
        let dir = root.join(name.trim());
        if dir.join("trainer_state.json").exists() {
            return Ok(Some(dir));
        }
    }
    Ok(list(&root)?.into_iter().max().map(|(_, d)| d))
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = fs::read_to_string(&path).map_err(|e| io_err(&path, "cannot read", e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))
}

/// AdamW moments as `exp_avg.NAME` / `exp_avg_sq.NAME` tensors; counts in the metadata.
fn save_optimizer(path: &Path, params: &Params, opt: &AdamW) -> Result<()> {
    // The live moments, written one tensor at a time (on a GPU, copied to the host one at a
    // time): a copy of the whole state first would hold both moments of every parameter in
    // host memory at once.
    let (steps, state) = opt.state_ref();
    let names: Vec<&str> = params.iter().map(|(n, _)| n).collect();
    if names.len() != state.len() {
        return Err(Error::msg(format!(
            "checkpoint: the optimiser holds {} parameters but the model has {}",
            state.len(),
            names.len()
        )));
    }
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut meta = HashMap::new();
    meta.insert("steps".to_string(), steps.to_string());
    for (name, s) in names.iter().zip(state) {
        if let Some(s) = s {
            tensors.push((format!("exp_avg.{name}"), s.exp_avg.clone()));
            tensors.push((format!("exp_avg_sq.{name}"), s.exp_avg_sq.clone()));
            meta.insert(format!("step.{name}"), s.step.to_string());
        }
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    crate::io::save(path, &refs, Some(&meta))
}

/// Restores the optimiser state written by [`save`] (parameters matched by name).
pub fn load_optimizer(dir: &Path, params: &Params, opt: &mut AdamW) -> Result<()> {
    let path = dir.join("optimizer.safetensors");
    let file = crate::io::safetensors::TensorFile::open(&path)?;
    let meta = file.metadata().clone();
    let parse = |key: &str| -> Result<u64> {
        meta.get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::file(&path, format!("metadata '{key}' is missing or invalid")))
    };
    let mut state = AdamWState {
        steps: parse("steps")?,
        params: Vec::new(),
    };
    for (name, _) in params.iter() {
        let key = format!("exp_avg.{name}");
        state.params.push(if file.contains(&key) {
            Some(AdamWParamState {
                step: parse(&format!("step.{name}"))?,
                exp_avg: file.get(&key)?,
                exp_avg_sq: file.get(&format!("exp_avg_sq.{name}"))?,
            })
        } else {
            None
        });
    }
    opt.load_state(&state)
        .map_err(|e| Error::file(&path, e.to_string()))
}
