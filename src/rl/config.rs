//! The trainers' run configuration: a TOML file, then `--set section.key=value` overrides.
//!
//! ```toml
//! out = "runs/digits-grpo"
//! [model]
//! dir = "models/tiny"          # config.json (+ model.safetensors; random init when absent)
//! [data]
//! train = "suite:ocr"          # suite:NAME | jigsaw:RxC | PATH.jsonl
//! eval = ["suite:ocr"]
//! [optim]
//! lr = 1e-3
//! [train]
//! steps = 200
//! [grpo]
//! group_size = 8
//! ```
//! Every key has a default (below), so a file names only what it changes.

use crate::optim::LrSchedule;
use crate::rl::{LossType, ScaleRewards};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Run directory: metrics.jsonl, config.toml, checkpoints/.
    pub out: String,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub train: LoopConfig,
    pub grpo: GrpoConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A model directory: config.json, and model.safetensors unless `init_seed` is set.
    pub dir: String,
    /// Defaults to `<dir>/tokenizer.json`.
    pub tokenizer: Option<String>,
    /// Start from random weights with this seed instead of the directory's weights.
    pub init_seed: Option<u64>,
    /// "cpu" or "cuda".
    pub device: String,
    /// "f32", or "bf16" (CUDA): the forward and backward computed with bf16 copies of the f32
    /// weights, made each step; AdamW and checkpoints keep f32.
    pub dtype: String,
    /// Activation checkpointing: each decoder layer and vision block keeps only its inputs
    /// for the backward and computes its forward again there (memory for about a third more
    /// compute; `autograd::checkpoint`).
    pub gradient_checkpointing: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Training data: `suite:NAME`, `jigsaw:RxC` (e.g. jigsaw:2x2) or a JSONL file.
    pub train: String,
    /// Evaluated every `train.eval_every` steps (their eval splits), by greedy generation.
    pub eval: Vec<String>,
    /// Examples per evaluation set.
    pub eval_samples: usize,
    /// Seeds the order of the training data.
    pub seed: u64,
    /// Jigsaw answer format: "think", "no-think" or "plain".
    pub jigsaw_prompt: String,
    /// Side in pixels of the synthetic images (prior suites and jigsaw).
    pub image_size: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub min_lr: f64,
    /// "constant", "cosine" or "linear" (the last two after `warmup_steps`).
    pub schedule: String,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 = off.
    pub max_grad_norm: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    pub steps: u64,
    /// Examples per micro-batch (SFT); rollouts per micro-batch (GRPO).
    pub batch_size: usize,
    /// Micro-batches per optimiser step (SFT).
    pub grad_accum: usize,
    /// SFT: a micro-batch runs as at most this many sub-batches of similar length, so short
    /// examples do not pad to the longest; each sub-batch's loss is weighted by its share of
    /// the answer tokens, so the loss and gradient are the micro-batch's token mean as
    /// before. 1 = one padded batch.
    pub length_buckets: usize,
    pub seed: u64,
    /// 0 = never (an evaluation still runs at the end when `eval` is set).
    pub eval_every: u64,
    /// 0 = only at the end.
    pub save_every: u64,
    /// Checkpoints kept (0 = all).
    pub keep_checkpoints: usize,
    /// A metrics line on stderr every this many steps (the progress bar shows every step).
    pub log_every: u64,
    /// Show a progress bar (when stderr is a terminal).
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Prompts per optimiser step.
    pub prompts_per_step: usize,
    /// Completions per prompt (G).
    pub group_size: usize,
    /// Optimisation passes over one rollout batch (μ).
    pub mu: usize,
    pub beta: f64,
    pub epsilon: f64,
    /// Clip-higher ε_high; defaults to `epsilon`.
    pub epsilon_high: Option<f64>,
    /// grpo | bnpo | dr_grpo | dapo
    pub loss_type: String,
    /// group | batch | none
    pub scale_rewards: String,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    /// Reward weights for the jigsaw task: hit, accuracy, format.
    pub reward_weights: [f64; 3],
    /// Write completions whose answer is fully correct to this JSONL (an SFT dataset).
    pub export_correct: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            out: "runs/train".into(),
            model: ModelConfig::default(),
            data: DataConfig::default(),
            optim: OptimConfig::default(),
            train: LoopConfig::default(),
            grpo: GrpoConfig::default(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            dir: "models/tiny".into(),
            tokenizer: None,
            init_seed: None,
            device: "cpu".into(),
            dtype: "f32".into(),
            gradient_checkpointing: false,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: String::new(),
            eval: Vec::new(),
            eval_samples: 64,
            seed: 0,
            jigsaw_prompt: "no-think".into(),
            image_size: crate::tasks::TINY_IMAGE_SIZE,
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-3,
            min_lr: 0.0,
            schedule: "constant".into(),
            warmup_steps: 0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
        }
    }
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            steps: 100,
            batch_size: 16,
            grad_accum: 1,
            length_buckets: 4,
            seed: 0,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            log_every: 10,
            progress: true,
        }
    }
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            prompts_per_step: 8,
            group_size: 8,
            mu: 1,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: "dr_grpo".into(),
            scale_rewards: "group".into(),
            max_new_tokens: 16,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            reward_weights: [1.0, 1.0, 1.0],
            export_correct: None,
        }
    }
}

/// Parses `key=value` into a TOML value: integers, floats, booleans and arrays as TOML reads
/// them, anything else as a string.
fn parse_value(v: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("x = {v}"))
        .ok()
        .and_then(|mut t| t.remove("x"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()))
}

impl TrainConfig {
    /// The file (if any) with `overrides` (`section.key=value`) applied, validated.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<TrainConfig> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| Error::file(p, format!("cannot read: {e}")))?;
                toml::from_str::<toml::Table>(&text)
                    .map_err(|e| Error::file(p, format!("invalid TOML: {e}")))?
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| Error::msg(format!("--set {o}: want section.key=value")))?;
            let parts: Vec<&str> = key.trim().split('.').collect();
            let mut t = &mut table;
            for p in &parts[..parts.len() - 1] {
                t = t
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| Error::msg(format!("--set {o}: '{p}' is not a section")))?;
            }
            t.insert(
                parts[parts.len() - 1].to_string(),
                parse_value(value.trim()),
            );
        }
        let cfg: TrainConfig = toml::Value::Table(table).try_into().map_err(|e| {
            Error::msg(format!(
                "train config{}: {e}",
                path.map(|p| format!(" {}", p.display()))
                    .unwrap_or_default()
            ))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::msg(format!("config to TOML: {e}")))
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::msg(format!("train config: {m}")));
        if self.data.train.is_empty() {
            return bad("data.train is not set (suite:NAME, jigsaw:RxC or a .jsonl file)".into());
        }
        if self.train.batch_size == 0
            || self.train.grad_accum == 0
            || self.train.length_buckets == 0
        {
            return bad(
                "train.batch_size, train.grad_accum and train.length_buckets must be >= 1".into(),
            );
        }
        if self.grpo.group_size < 2 || self.grpo.prompts_per_step == 0 || self.grpo.mu == 0 {
            return bad("grpo.group_size must be >= 2, prompts_per_step and mu >= 1".into());
        }
        if !(self.optim.lr.is_finite() && self.optim.lr >= 0.0) {
            return bad(format!(
                "optim.lr {} must be finite and >= 0",
                self.optim.lr
            ));
        }
        self.device()?;
        self.compute_dtype()?;
        self.loss_type()?;
        self.scale_rewards()?;
        self.schedule()?.validate()
    }

    /// `model.dtype`: f32, or bf16 on CUDA (the CPU backend computes in f32).
    pub fn compute_dtype(&self) -> Result<crate::DType> {
        let d = &self.model.dtype;
        let why = |why: String| Error::msg(format!("train config: model.dtype \"{d}\": {why}"));
        let dtype: crate::DType = d.parse().map_err(|_| why("want f32 or bf16".into()))?;
        dtype
            .check_compute_on(self.device()?, "model.device = \"cuda\"")
            .map_err(why)?;
        Ok(dtype)
    }

    /// `model.device`: cpu or cuda (also cuda:0 or gpu).
    pub fn device(&self) -> Result<crate::Device> {
        self.model
            .device
            .parse()
            .map_err(|e| Error::msg(format!("train config: model.device: {e}")))
    }

    pub fn loss_type(&self) -> Result<LossType> {
        self.grpo.loss_type.parse()
    }

    pub fn scale_rewards(&self) -> Result<ScaleRewards> {
        match self.grpo.scale_rewards.as_str() {
            "group" => Ok(ScaleRewards::Group),
            "batch" => Ok(ScaleRewards::Batch),
            "none" => Ok(ScaleRewards::None),
            s => Err(Error::msg(format!(
                "train config: grpo.scale_rewards '{s}': want group, batch or none"
            ))),
        }
    }

    pub fn schedule(&self) -> Result<LrSchedule> {
        let o = &self.optim;
        let total = self.train.steps;
        Ok(match o.schedule.as_str() {
            "constant" if o.warmup_steps == 0 => LrSchedule::Constant { lr: o.lr },
            "constant" => LrSchedule::WarmupConstant {
                lr: o.lr,
                warmup_steps: o.warmup_steps,
            },
            "cosine" => LrSchedule::WarmupCosine {
                peak_lr: o.lr,
                min_lr: o.min_lr,
                warmup_steps: o.warmup_steps,
                total_steps: total,
            },
            "linear" => LrSchedule::WarmupLinear {
                peak_lr: o.lr,
                warmup_steps: o.warmup_steps,
                total_steps: total,
            },
            s => {
                return Err(Error::msg(format!(
                    "train config: optim.schedule '{s}': want constant, cosine or linear"
                )))
            }
        })
    }
}
