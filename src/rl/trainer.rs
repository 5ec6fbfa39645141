//! The SFT and GRPO trainers: one loop, two step functions.
//!
//! Each step: a batch from the task (SFT: examples with their answers; GRPO: prompts, G
//! sampled completions each, rewards, group advantages), loss, backward, gradient clipping,
//! AdamW. Then a metrics line in `RUN/metrics.jsonl`, an evaluation every `eval_every` steps
//! (greedy answers scored by each eval task) and a checkpoint every `save_every` steps.
//! A non-finite loss or gradient stops the run before the weights change, naming the step and
//! the last good checkpoint.

use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule, ParamGroup};
use crate::qwen2_5_vl::generate::{generate, generate_groups, Prompt, SamplingConfig};
use crate::qwen2_5_vl::model::QwenVl;
use crate::qwen2_5_vl::tokenizer::QwenTokenizer;
use crate::rl::checkpoint::{self, Checkpoint, TrainerState};
use crate::rl::config::TrainConfig;
use crate::rl::data::{
    collate, completion_logits, length_groups, logprobs_of, policy_logprobs, tempered, Collated,
    Encoded, Encoder, GROUP_OVERHEAD_TOKENS,
};
use crate::rl::task::{Split, Task};
use crate::rl::{group_advantages, policy_loss, PolicyLossConfig, PolicyLossInputs};
use crate::{no_grad, DType, Device, Error, Result, Rng, Tensor};
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sft,
    Grpo,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sft => "sft",
            Kind::Grpo => "grpo",
        }
    }
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub kind: Kind,
    pub model: QwenVl,
    pub encoder: Encoder,
    pub state: TrainerState,
    config_json: Value,
    tokenizer_path: PathBuf,
    opt: AdamW,
    schedule: LrSchedule,
    task: Box<dyn Task>,
    evals: Vec<Box<dyn Task>>,
    reference: Option<QwenVl>,
    /// `model.dtype`: the dtype of the copies the model computes with (`compute`).
    compute_dtype: DType,
    run: PathBuf,
    metrics: File,
    last_checkpoint: Option<PathBuf>,
    /// The current epoch's order of a finite training set: (epoch, permutation).
    order: Option<(u64, Vec<u64>)>,
    export: Option<RolloutExport>,
}

/// Metrics of one step or evaluation, in insertion order.
pub type Metrics = serde_json::Map<String, Value>;

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

/// AdamW over the model's parameters in their `Params` order; matrices decayed, vectors
/// (norms, biases) not.
fn optimizer(model: &QwenVl, cfg: &TrainConfig) -> Result<AdamW> {
    // Checkpoints store moments by parameter name in `Params` order, so the optimiser must see
    // the parameters in that order: one group when decay is uniform, else both in name order.
    let o = &cfg.optim;
    let adam = AdamWConfig {
        betas: (o.beta1, o.beta2),
        eps: o.eps,
        weight_decay: o.weight_decay,
    };
    if o.weight_decay == 0.0 {
        return AdamW::new(model.params.tensors(), adam);
    }
    let groups = model
        .params
        .iter()
        .map(|(_, t)| {
            ParamGroup::new(
                vec![t.clone()],
                if t.rank() >= 2 { o.weight_decay } else { 0.0 },
            )
        })
        .collect();
    AdamW::with_groups(groups, adam)
}

impl Trainer {
    /// Builds a trainer for `cfg`; with `resume`, continues from the run's latest checkpoint.
    pub fn new(
        kind: Kind,
        cfg: TrainConfig,
        task: Box<dyn Task>,
        evals: Vec<Box<dyn Task>>,
        resume: bool,
    ) -> Result<Trainer> {
        // Before the run folder exists: a bad device or dtype leaves nothing behind.
        let device = cfg.device()?;
        let compute_dtype = cfg.compute_dtype()?;
        let run = PathBuf::from(&cfg.out);
        std::fs::create_dir_all(&run)
            .map_err(|e| Error::file(&run, format!("cannot create: {e}")))?;
        let model_dir = PathBuf::from(&cfg.model.dir);
        let resume_from = if resume {
            let dir = checkpoint::latest(&run)?;
            if dir.is_none() {
                eprintln!("no checkpoint in {} yet: starting a new run", run.display());
            }
            dir
        } else {
            None
        };
        let tokenizer_path = match (&resume_from, &cfg.model.tokenizer) {
            (Some(d), _) if d.join("tokenizer.json").exists() => d.join("tokenizer.json"),
            (_, Some(t)) => PathBuf::from(t),
            _ => model_dir.join("tokenizer.json"),
        };
        let tokenizer = QwenTokenizer::from_file(&tokenizer_path)?;
        let (model, config_json) = match &resume_from {
            Some(d) => (
                QwenVl::load(d, DType::F32)?,
                read_json(&d.join("config.json"))?,
            ),
            None => {
                let config_json = read_json(&model_dir.join("config.json"))?;
                let model = match cfg.model.init_seed {
                    Some(seed) => {
                        let config = crate::qwen2_5_vl::config::Config::from_json(&config_json)
                            .map_err(|e| {
                                Error::file(model_dir.join("config.json"), e.to_string())
                            })?;
                        QwenVl::random(config, DType::F32, &mut Rng::new(seed))?
                    }
                    None => QwenVl::load(&model_dir, DType::F32)?,
                };
                (model, config_json)
            }
        };
        let mut model = if device == Device::Cpu {
            model
        } else {
            model.to_device(device)?
        };
        model.config.gradient_checkpointing = cfg.model.gradient_checkpointing;
        let encoder = Encoder::new(tokenizer, &model.config);
        let reference = if kind == Kind::Grpo && cfg.grpo.beta > 0.0 {
            // The frozen reference is the starting policy: the model directory's weights.
            let r = match cfg.model.init_seed {
                Some(seed) => {
                    QwenVl::random(model.config.clone(), DType::F32, &mut Rng::new(seed))?
                }
                None => QwenVl::load(&model_dir, DType::F32)?,
            };
            // Frozen: in the compute dtype once (bf16 copies without a graph).
            let r = r.to_device(device)?;
            Some(no_grad(|| r.cast(compute_dtype))?)
        } else {
            None
        };
        let mut opt = optimizer(&model, &cfg)?;
        let state = match &resume_from {
            Some(d) => {
                checkpoint::load_optimizer(d, &model.params, &mut opt)?;
                let s = checkpoint::load_state(d)?;
                if s.kind != kind.name() {
                    return Err(Error::file(
                        d,
                        format!(
                            "checkpoint is from a '{}' run, not '{}'",
                            s.kind,
                            kind.name()
                        ),
                    ));
                }
                eprintln!("resuming from {} (step {})", d.display(), s.step);
                s
            }
            None => TrainerState {
                step: 0,
                data_position: 0,
                rng_state: Rng::new(cfg.train.seed).state(),
                kind: kind.name().into(),
                last_metrics: Value::Null,
            },
        };
        let metrics_path = run.join("metrics.jsonl");
        truncate_metrics(&metrics_path, state.step)?;
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::file(&metrics_path, format!("cannot open: {e}")))?;
        let export = match &cfg.grpo.export_correct {
            Some(p) if kind == Kind::Grpo => Some(RolloutExport::open(Path::new(p))?),
            _ => None,
        };
        std::fs::write(run.join("config.toml"), cfg.to_toml()?)
            .map_err(|e| Error::file(run.join("config.toml"), format!("cannot write: {e}")))?;
        let schedule = cfg.schedule()?;
        Ok(Trainer {
            cfg,
            kind,
            model,
            encoder,
            last_checkpoint: resume_from,
            state,
            config_json,
            tokenizer_path,
            opt,
            schedule,
            task,
            evals,
            reference,
            compute_dtype,
            run,
            metrics,
            order: None,
            export,
        })
    }

    pub fn run_dir(&self) -> &Path {
        &self.run
    }

    /// Trains to `train.steps`, evaluating and saving on schedule; returns the last metrics.
    pub fn train(&mut self) -> Result<Metrics> {
        let total = self.cfg.train.steps;
        let bar = progress_bar(total, self.state.step, self.cfg.train.progress);
        let mut last = Metrics::new();
        while self.state.step < total {
            let step = self.state.step + 1;
            let mut m = match self.kind {
                Kind::Sft => self.sft_step()?,
                Kind::Grpo => self.grpo_step()?,
            };
            self.state.step = step;
            let ev = self.cfg.train.eval_every;
            if (ev > 0 && step.is_multiple_of(ev)) || (step == total && !self.evals.is_empty()) {
                m.extend(self.evaluate(self.cfg.data.eval_samples)?);
            }
            let mut line = Metrics::new();
            line.insert("step".into(), json!(step));
            line.extend(m);
            self.log(&line)?;
            bar.set_position(step);
            bar.set_message(summary(&line));
            let le = self.cfg.train.log_every;
            if bar.is_hidden() && le > 0 && (step.is_multiple_of(le) || step == total) {
                eprintln!("{}", summary(&line));
            }
            self.state.last_metrics = Value::Object(line.clone());
            let se = self.cfg.train.save_every;
            if (se > 0 && step.is_multiple_of(se)) || step == total {
                self.save()?;
            }
            last = line;
        }
        bar.finish_and_clear();
        Ok(last)
    }

    /// Writes a checkpoint of the current state; returns its directory.
    pub fn save(&mut self) -> Result<PathBuf> {
        // The live parameters: the writer copies each to the host as it writes it (a copy of
        // the whole model first held all of it in host memory at once).
        let dir = checkpoint::save(
            &self.run,
            &Checkpoint {
                config_json: &self.config_json,
                params: &self.model.params,
                optimizer: &self.opt,
                state: &self.state,
                tokenizer: Some(&self.tokenizer_path),
            },
            self.cfg.train.keep_checkpoints,
        )?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    fn log(&mut self, line: &Metrics) -> Result<()> {
        let path = self.run.join("metrics.jsonl");
        writeln!(self.metrics, "{}", Value::Object(line.clone()))
            .and_then(|_| self.metrics.flush())
            .map_err(|e| Error::file(&path, format!("cannot write: {e}")))
    }

    /// Stops the run when `value` is not finite (before the optimiser touches the weights).
    fn check_finite(&self, what: &str, value: f64) -> Result<()> {
        if value.is_finite() {
            return Ok(());
        }
        let kept = match &self.last_checkpoint {
            Some(d) => format!("the last good checkpoint is {}", d.display()),
            None => "no checkpoint was written yet".to_string(),
        };
        Err(Error::msg(format!(
            "step {}: the {what} is {value}; training stopped before updating the weights ({kept})",
            self.state.step + 1
        )))
    }

    /// The index of training example `position` (finite sets: a fresh shuffle every epoch).
    fn train_index(&mut self, position: u64) -> u64 {
        let Some(n) = self.task.len(Split::Train) else {
            return position;
        };
        let n = n.max(1) as u64;
        let epoch = position / n;
        if self.order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut rng = Rng::new(self.cfg.data.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut perm: Vec<u64> = (0..n).collect();
            for i in (1..perm.len()).rev() {
                perm.swap(i, rng.below(i as u64 + 1) as usize);
            }
            self.order = Some((epoch, perm));
        }
        self.order
            .as_ref()
            .map(|(_, p)| p[(position % n) as usize])
            .unwrap_or(0)
    }

    fn next_indices(&mut self, n: usize) -> Vec<u64> {
        let start = self.state.data_position;
        self.state.data_position += n as u64;
        (start..start + n as u64)
            .map(|p| self.train_index(p))
            .collect()
    }

    fn step_optimizer(&mut self, metrics: &mut Metrics) -> Result<()> {
        let max = self.cfg.optim.max_grad_norm;
        let params: Vec<Tensor> = self.model.params.tensors();
        let norm = clip_grad_norm(&params, if max > 0.0 { max } else { f64::MAX })?;
        self.check_finite("gradient norm", norm)?;
        let lr = self.schedule.lr_at(self.state.step);
        self.opt.step(lr)?;
        self.opt.zero_grad();
        metrics.insert("lr".into(), json!(lr));
        metrics.insert("grad_norm".into(), json!(norm));
        Ok(())
    }

    fn sft_step(&mut self) -> Result<Metrics> {
        let t0 = Instant::now();
        let accum = self.cfg.train.grad_accum;
        let (mut loss_sum, mut tokens, mut sub_batches) = (0.0, 0usize, 0usize);
        for _ in 0..accum {
            let idx = self.next_indices(self.cfg.train.batch_size);
            let items = idx
                .iter()
                .map(|&i| self.encoder.example(&self.task.example(Split::Train, i)?))
                .collect::<Result<Vec<Encoded>>>()?;
            tokens += items.iter().map(|e| e.input_ids.len()).sum::<usize>();
            // Sub-batches by length, each weighted by its share of the answer tokens: the sum
            // is the micro-batch's token-mean loss (docs/training.md).
            let answer_tokens =
                |idx: &[usize]| -> usize { idx.iter().map(|&i| items[i].completion().len()).sum() };
            let all: Vec<usize> = (0..items.len()).collect();
            let total = answer_tokens(&all);
            let groups = if total == 0 {
                vec![all]
            } else {
                length_groups(&items, self.cfg.train.length_buckets, GROUP_OVERHEAD_TOKENS)
            };
            for group in groups {
                let share = if total == 0 {
                    1.0
                } else {
                    answer_tokens(&group) as f64 / total as f64
                };
                if share == 0.0 {
                    continue;
                }
                sub_batches += 1;
                let sub: Vec<&Encoded> = group.iter().map(|&i| &items[i]).collect();
                let c = self.collate_on_device(&sub)?;
                // A graph of its own for each backward (bf16: its own copies, as a backward frees
                // the graph it ran through).
                let loss = self
                    .compute()?
                    .forward(&c.batch)?
                    .loss
                    .ok_or_else(|| Error::msg("SFT: the model returned no loss"))?;
                let l = loss.to_f64s()?[0];
                self.check_finite("loss", l)?;
                let w = share / accum as f64;
                loss_sum += l * w;
                loss.mul_scalar(w)?.backward()?;
            }
        }
        let mut m = Metrics::new();
        m.insert("loss".into(), json!(loss_sum));
        m.insert("sub_batches".into(), json!(sub_batches));
        self.step_optimizer(&mut m)?;
        m.insert(
            "tokens_per_s".into(),
            json!(tokens as f64 / t0.elapsed().as_secs_f64()),
        );
        Ok(m)
    }

    /// The model that computes a forward: the f32 weights themselves, or (`model.dtype =
    /// "bf16"`) bf16 copies of them made now, whose backward adds the gradients to the f32
    /// weights in f32. Made for each backward, as a backward frees the graph it ran through.
    fn compute(&self) -> Result<QwenVl> {
        self.model.cast(self.compute_dtype)
    }

    fn collate_on_device(&self, items: &[&Encoded]) -> Result<Collated> {
        let mut c = collate(items, self.encoder.pad_id())?;
        let dev = self.model.device();
        if dev != Device::Cpu {
            // The token ids stay on the host: the forward reads them there (positions, the
            // image-token mask, the embedding rows), and `logprobs_of` uploads the completion
            // columns it gathers. On the device they were read back several times a forward.
            c.batch.labels = c.batch.labels.map(|t| t.to_device(dev)).transpose()?;
            c.batch.pixel_values = c.batch.pixel_values.map(|t| t.to_device(dev)).transpose()?;
            c.completion_mask = c.completion_mask.to_device(dev)?;
        }
        Ok(c)
    }

    fn sampling(&self, greedy: bool) -> SamplingConfig {
        let g = &self.cfg.grpo;
        let sp = self.encoder.tokenizer.special();
        SamplingConfig {
            max_new_tokens: g.max_new_tokens,
            temperature: if greedy { 0.0 } else { g.temperature },
            top_k: g.top_k,
            top_p: g.top_p,
            stop_ids: sp.stop_ids().to_vec(),
        }
    }

    fn grpo_step(&mut self) -> Result<Metrics> {
        let t0 = Instant::now();
        let g = self.cfg.grpo.clone();
        let idx = self.next_indices(g.prompts_per_step);
        let mut prompts = Vec::with_capacity(idx.len());
        for &i in &idx {
            let ex = self.task.example(Split::Train, i)?;
            prompts.push((
                ex.clone(),
                self.encoder.prompt(ex.image.as_ref(), &ex.question)?,
            ));
        }
        // Rollouts: G samples of every prompt, from the trainer's random stream.
        let rollout_prompts: Vec<Prompt> = prompts
            .iter()
            .map(|(_, p)| Prompt {
                input_ids: p.input_ids.clone(),
                pixel_values: p.pixel_values.clone(),
                image_grid_thw: p.image_grid_thw.clone(),
            })
            .collect();
        let mut rng = Rng::from_state(self.state.rng_state);
        // The sampling policy (no graph), also the old policy of the passes below.
        let policy = no_grad(|| self.compute())?;
        let mut gens = no_grad(|| {
            generate_groups(
                &policy,
                &rollout_prompts,
                g.group_size,
                &self.sampling(false),
                &mut rng,
            )
        })?;
        self.state.rng_state = rng.state();
        let gen_s = t0.elapsed().as_secs_f64();
        let mut rewards = Vec::with_capacity(gens.len());
        let mut items = Vec::with_capacity(gens.len());
        let (mut n_correct, mut gen_tokens) = (0usize, 0usize);
        for (r, gen) in gens.iter_mut().enumerate() {
            let (ex, prompt) = &prompts[r / g.group_size];
            truncate_at_vision_tokens(&mut gen.tokens, &self.model.config);
            let text = self.encoder.decode(&gen.tokens)?;
            let s = self
                .task
                .score(Split::Train, idx[r / g.group_size], &text)?;
            rewards.push(s.reward);
            gen_tokens += gen.tokens.len();
            if s.correct {
                n_correct += 1;
                if let Some(f) = &mut self.export {
                    f.write(ex, &text)?;
                }
            }
            items.push(prompt.with_completion(&gen.tokens));
        }
        let rewards_t = Tensor::from_f64s(&rewards, &[rewards.len()], DType::F32)?;
        let adv = group_advantages(&rewards_t, g.group_size, self.cfg.scale_rewards()?)?;
        let adv = adv.to_f64s()?;
        let loss_cfg = PolicyLossConfig {
            loss_type: self.cfg.loss_type()?,
            beta: g.beta,
            epsilon: g.epsilon,
            epsilon_high: g.epsilon_high,
            max_completion_len: Some(g.max_new_tokens),
        };
        // Micro-batches of rollouts; each carries its share of the batch-level normalisation.
        let mb = self.cfg.train.batch_size.max(1);
        let chunks: Vec<Vec<usize>> = (0..items.len())
            .collect::<Vec<_>>()
            .chunks(mb)
            .map(|c| c.to_vec())
            .collect();
        let collated = chunks
            .iter()
            .map(|c| {
                let sel: Vec<&Encoded> = c.iter().map(|&i| &items[i]).collect();
                self.collate_on_device(&sel)
            })
            .collect::<Result<Vec<_>>>()?;
        let total_tokens: f64 = items.iter().map(|e| e.completion().len() as f64).sum();
        let old: Vec<Option<Tensor>> = if g.mu > 1 {
            collated
                .iter()
                .map(|c| no_grad(|| policy_logprobs(&policy, c, g.temperature)).map(Some))
                .collect::<Result<_>>()?
        } else {
            vec![None; collated.len()]
        };
        let refs: Vec<Option<Tensor>> = match &self.reference {
            Some(r) => collated
                .iter()
                .map(|c| no_grad(|| policy_logprobs(r, c, g.temperature)).map(Some))
                .collect::<Result<_>>()?,
            None => vec![None; collated.len()],
        };
        let mut m = Metrics::new();
        let (mut loss_sum, mut kl_sum, mut clipped, mut ent_sum) = (0.0, 0.0, 0.0, 0.0);
        drop(policy);
        for pass in 0..g.mu {
            for (k, c) in collated.iter().enumerate() {
                if c.completion_cols == 0 {
                    continue;
                }
                let rows = chunks[k].len();
                // Tempered like the sampler (see `policy_logprobs`); the entropy below too.
                // A graph of its own for each backward (bf16: copies of the weights as they
                // are after the last pass's step).
                let logits = tempered(completion_logits(&self.compute()?, c)?, g.temperature)?;
                let logps = logprobs_of(&logits, c)?;
                let a: Vec<f64> = chunks[k].iter().map(|&i| adv[i]).collect();
                let a = Tensor::from_f64s(&a, &[rows], DType::F32)?.to_device(logps.device())?;
                let old_lp = match &old[k] {
                    Some(o) => o.clone(),
                    None => logps.detach(),
                };
                let loss = policy_loss(
                    &PolicyLossInputs {
                        logps: &logps,
                        old_logps: &old_lp,
                        ref_logps: refs[k].as_ref(),
                        advantages: &a,
                        mask: &c.completion_mask,
                    },
                    &loss_cfg,
                )?;
                let mb_tokens = c.completion_mask.to_f64s()?.iter().sum::<f64>();
                let scale = match loss_cfg.loss_type {
                    crate::rl::LossType::Grpo | crate::rl::LossType::DrGrpo => {
                        rows as f64 / items.len() as f64
                    }
                    crate::rl::LossType::Bnpo => 1.0 / collated.len() as f64,
                    crate::rl::LossType::Dapo => mb_tokens / total_tokens.max(1.0),
                };
                let l = loss.to_f64s()?[0];
                self.check_finite("loss", l)?;
                if pass == g.mu - 1 {
                    loss_sum += l * scale;
                    let (kl, clip, ent) = no_grad(|| {
                        token_stats(&logits, &logps, &old_lp, refs[k].as_ref(), &a, c, &loss_cfg)
                    })?;
                    kl_sum += kl;
                    clipped += clip;
                    ent_sum += ent;
                }
                loss.mul_scalar(scale)?.backward()?;
            }
            self.step_optimizer(&mut m)?;
        }
        let n = rewards.len() as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let std = (rewards.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>()
            / (n - 1.0).max(1.0))
        .sqrt();
        let tok = total_tokens.max(1.0);
        let mut out = Metrics::new();
        out.insert("loss".into(), json!(loss_sum));
        out.insert("reward_mean".into(), json!(mean));
        out.insert("reward_std".into(), json!(std));
        out.insert("correct_frac".into(), json!(n_correct as f64 / n));
        out.insert("kl".into(), json!(kl_sum / tok));
        out.insert("clip_frac".into(), json!(clipped / tok));
        out.insert("entropy".into(), json!(ent_sum / tok));
        out.insert("completion_len".into(), json!(gen_tokens as f64 / n));
        out.extend(m);
        out.insert(
            "gen_tokens_per_s".into(),
            json!(gen_tokens as f64 / gen_s.max(1e-9)),
        );
        out.insert(
            "tokens_per_s".into(),
            json!(
                items.iter().map(|e| e.input_ids.len()).sum::<usize>() as f64
                    / t0.elapsed().as_secs_f64()
            ),
        );
        Ok(out)
    }

    /// Greedy answers to the first `n` examples of every eval task's eval split:
    /// `eval/<task>` = fraction correct, `eval/<task>/reward` = mean reward.
    pub fn evaluate(&self, n: usize) -> Result<Metrics> {
        let mut m = Metrics::new();
        let compute = no_grad(|| self.compute())?;
        for task in &self.evals {
            let (acc, reward) = evaluate_task(
                &compute,
                &self.encoder,
                task.as_ref(),
                n,
                32,
                self.cfg.grpo.max_new_tokens,
            )?;
            m.insert(format!("eval/{}", task.name()), json!(acc));
            m.insert(format!("eval/{}/reward", task.name()), json!(reward));
        }
        Ok(m)
    }
}

/// Cuts a sampled completion before its first vision token: image/video placeholders in a
/// completion have no pixels behind them, so the model cannot be run on them.
fn truncate_at_vision_tokens(tokens: &mut Vec<u32>, c: &crate::qwen2_5_vl::config::Config) {
    let vision = c.vision_token_ids();
    if let Some(i) = tokens.iter().position(|&t| vision.contains(&(t as i64))) {
        tokens.truncate(i);
    }
}

/// Greedy accuracy and mean reward of `model` on the first `n` eval examples of `task`.
pub fn evaluate_task(
    model: &QwenVl,
    encoder: &Encoder,
    task: &dyn Task,
    n: usize,
    batch: usize,
    max_new_tokens: usize,
) -> Result<(f64, f64)> {
    let n = task.len(Split::Eval).map_or(n, |l| l.min(n));
    if n == 0 {
        return Ok((0.0, 0.0));
    }
    let cfg = SamplingConfig {
        max_new_tokens,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        stop_ids: encoder.tokenizer.special().stop_ids().to_vec(),
    };
    let (mut correct, mut reward) = (0usize, 0.0);
    let idx: Vec<u64> = (0..n as u64).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let prompts = chunk
            .iter()
            .map(|&i| {
                let ex = task.example(Split::Eval, i)?;
                let p = encoder.prompt(ex.image.as_ref(), &ex.question)?;
                Ok(Prompt {
                    input_ids: p.input_ids,
                    pixel_values: p.pixel_values,
                    image_grid_thw: p.image_grid_thw,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let gens = no_grad(|| generate(model, &prompts, &cfg, &mut Rng::new(0)))?;
        for (&i, gen) in chunk.iter().zip(&gens) {
            let s = task.score(Split::Eval, i, &encoder.decode(&gen.tokens)?)?;
            correct += s.correct as usize;
            reward += s.reward;
        }
    }
    Ok((correct as f64 / n as f64, reward / n as f64))
}

/// Per micro-batch sums over completion tokens: k3 KL (when a reference is given), clipped
/// tokens (TRL's low/high clip: ratio outside the ε band on the side the advantage pushes),
/// and the policy's entropy.
fn token_stats(
    logits: &Tensor,
    logps: &Tensor,
    old: &Tensor,
    reference: Option<&Tensor>,
    adv: &Tensor,
    c: &Collated,
    cfg: &PolicyLossConfig,
) -> Result<(f64, f64, f64)> {
    let mask = c.completion_mask.to_f64s()?;
    let lp = logps.to_f64s()?;
    let old = old.to_f64s()?;
    let adv = adv.to_f64s()?;
    let cols = c.completion_cols;
    let ls = logits.log_softmax(-1)?;
    let ent = ls.exp()?.mul(&ls)?.sum(-1, false)?.neg()?.to_f64s()?;
    let refv = reference.map(|r| r.to_f64s()).transpose()?;
    let (lo, hi) = (
        1.0 - cfg.epsilon,
        1.0 + cfg.epsilon_high.unwrap_or(cfg.epsilon),
    );
    let (mut kl, mut clip, mut e) = (0.0, 0.0, 0.0);
    for (i, &mk) in mask.iter().enumerate() {
        if mk == 0.0 {
            continue;
        }
        let a = adv[i / cols];
        let ratio = (lp[i] - old[i]).exp();
        if (ratio < lo && a < 0.0) || (ratio > hi && a > 0.0) {
            clip += 1.0;
        }
        if let Some(r) = &refv {
            let d = r[i] - lp[i];
            kl += d.exp() - d - 1.0;
        }
        e += ent[i];
    }
    Ok((kl, clip, e))
}

/// Correct rollouts as an SFT dataset: JSONL records (the tasks' format) with the images
/// written beside the file, under `<stem>-images/`.
struct RolloutExport {
    file: File,
    path: PathBuf,
    images: PathBuf,
    count: usize,
}

impl RolloutExport {
    fn open(path: &Path) -> Result<RolloutExport> {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "rollouts".into());
        let images = path.with_file_name(format!("{stem}-images"));
        std::fs::create_dir_all(&images)
            .map_err(|e| Error::file(&images, format!("cannot create: {e}")))?;
        let count = std::fs::read_to_string(path)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        Ok(RolloutExport {
            file,
            path: path.to_path_buf(),
            images,
            count,
        })
    }

    fn write(&mut self, ex: &crate::rl::data::Example, completion: &str) -> Result<()> {
        let image = match &ex.image {
            Some(img) => {
                let name = format!("{:06}.png", self.count);
                let p = self.images.join(&name);
                img.save(&p)
                    .map_err(|e| Error::file(&p, format!("cannot write image: {e}")))?;
                let dir = self
                    .images
                    .file_name()
                    .map(|d| d.to_string_lossy().to_string());
                Value::String(format!("{}/{name}", dir.unwrap_or_default()))
            }
            None => Value::Null,
        };
        let line = json!({"image": image, "question": ex.question, "answer": completion.trim(), "scorer": "exact"});
        self.count += 1;
        writeln!(self.file, "{line}")
            .map_err(|e| Error::file(&self.path, format!("cannot write: {e}")))
    }
}

/// Drops metrics lines after `step` (a resumed run rewrites them).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| Error::file(path, format!("cannot rewrite: {e}")))
}

fn progress_bar(total: u64, pos: u64, enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_position(pos);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// One short line: step, loss, reward, evals.
pub fn summary(m: &Metrics) -> String {
    m.iter()
        .filter(|(k, _)| {
            matches!(k.as_str(), "step" | "loss" | "reward_mean" | "lr")
                || k.starts_with("eval/") && !k.ends_with("/reward")
        })
        .map(|(k, v)| match v.as_f64() {
            Some(x) if k != "step" => format!("{k} {x:.4}"),
            _ => format!("{k} {v}"),
        })
        .collect::<Vec<_>>()
        .join("  ")
}
