//! `tessera demo`: an end-to-end training run on a synthetic task. The model sees eight
//! random digits and a separator and must write them sorted; the loss counts only the
//! answer. Everything runs through tessera: fused ops, autograd, AdamW with warmup + cosine,
//! gradient clipping, and a safetensors checkpoint at the end.

use crate::nn::tiny_lm::{TinyLm, TinyLmConfig};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::{no_grad, DType, Error, Result, Rng, Tensor};
use std::time::Instant;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Optimiser steps.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Digits per sequence.
    #[arg(long, default_value_t = 8)]
    digits: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print every N steps.
    #[arg(long, default_value_t = 50)]
    log_every: u64,
    /// Where to write the trained weights (safetensors).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const SEP: i64 = 10;
const VOCAB: usize = 11;

/// A batch of (input ids [B, 2n], labels [B, 2n]) for "digits SEP sorted-digits".
fn batch(rng: &mut Rng, b: usize, n: usize) -> Result<(Tensor, Tensor)> {
    let t = 2 * n + 1;
    let (mut ids, mut labels) = (
        Vec::with_capacity(b * (t - 1)),
        Vec::with_capacity(b * (t - 1)),
    );
    for _ in 0..b {
        let digits: Vec<i64> = (0..n).map(|_| rng.below(10) as i64).collect();
        let mut sorted = digits.clone();
        sorted.sort_unstable();
        let seq: Vec<i64> = digits.iter().copied().chain([SEP]).chain(sorted).collect();
        ids.extend_from_slice(&seq[..t - 1]);
        // Position p predicts seq[p+1]; only the answer (after SEP) counts.
        labels.extend((1..t).map(|p| if p > n { seq[p] } else { -100 }));
    }
    Ok((
        Tensor::from_vec(ids, &[b, t - 1])?,
        Tensor::from_vec(labels, &[b, t - 1])?,
    ))
}

/// Token accuracy and whole-sequence accuracy of the argmax prediction on the answer.
fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<(f64, f64)> {
    let v = logits.to_vec::<f32>()?;
    let l = labels.to_vec::<i64>()?;
    let (b, t) = (labels.dim(0)?, labels.dim(1)?);
    let (mut hit, mut total, mut exact) = (0, 0, 0);
    for bi in 0..b {
        let mut all = true;
        for p in 0..t {
            let y = l[bi * t + p];
            if y < 0 {
                continue;
            }
            let row = &v[(bi * t + p) * VOCAB..(bi * t + p + 1) * VOCAB];
            let pred = (0..VOCAB).fold(0, |m, i| if row[i] > row[m] { i } else { m });
            total += 1;
            if pred as i64 == y {
                hit += 1;
            } else {
                all = false;
            }
        }
        exact += all as usize;
    }
    Ok((hit as f64 / total.max(1) as f64, exact as f64 / b as f64))
}

pub fn run(a: DemoArgs) -> Result<()> {
    if a.digits == 0 || a.batch == 0 || a.steps == 0 {
        return Err(Error::msg(
            "demo: --digits, --batch and --steps must be positive",
        ));
    }
    let config = TinyLmConfig {
        vocab: VOCAB,
        hidden: 128,
        intermediate: 352,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        rope_theta: 10000.0,
        eps: 1e-6,
    };
    let mut rng = Rng::new(a.seed);
    let model = TinyLm::new(config, DType::F32, &mut rng)?;
    let params = model.params();
    let mut opt = AdamW::new(
        params.tensors(),
        AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let schedule = LrSchedule::WarmupCosine {
        peak_lr: a.lr,
        min_lr: a.lr * 0.1,
        warmup_steps: (a.steps / 20).max(1),
        total_steps: a.steps,
    };
    println!(
        "tessera demo: sort {} digits | model {} params ({} layers, hidden {}, GQA {}/{} heads) | batch {} | {} threads",
        a.digits,
        params.numel(),
        config.layers,
        config.hidden,
        config.heads,
        config.kv_heads,
        a.batch,
        rayon::current_num_threads()
    );
    let mut eval_rng = Rng::new(a.seed ^ 0xe7a1);
    let (eval_ids, eval_labels) = batch(&mut eval_rng, 256, a.digits)?;
    let start = Instant::now();
    let mut window = (0.0, 0u64);
    for step in 0..a.steps {
        let (ids, labels) = batch(&mut rng, a.batch, a.digits)?;
        let loss = model.forward(&ids)?.cross_entropy(&labels, -100)?;
        let loss_v = loss.to_scalar()?;
        if !loss_v.is_finite() {
            return Err(Error::msg(format!(
                "demo: loss became {loss_v} at step {step}"
            )));
        }
        loss.backward()?;
        let norm = clip_grad_norm(opt.params().collect::<Vec<_>>(), 1.0)?;
        let lr = schedule.lr_at(step);
        opt.step(lr)?;
        opt.zero_grad();
        window = (window.0 + loss_v, window.1 + 1);
        if (step + 1) % a.log_every == 0 || step + 1 == a.steps {
            let logits = no_grad(|| model.forward(&eval_ids))?;
            let eval_loss = no_grad(|| logits.cross_entropy(&eval_labels, -100))?.to_scalar()?;
            let (tok, exact) = accuracy(&logits, &eval_labels)?;
            let ms = start.elapsed().as_secs_f64() * 1e3 / (step + 1) as f64;
            println!(
                "step {:>5}/{} | train loss {:.4} | eval loss {:.4} | token acc {:.3} | sorted exactly {:.3} | lr {:.2e} | grad norm {:.2} | {:.1} ms/step",
                step + 1,
                a.steps,
                window.0 / window.1 as f64,
                eval_loss,
                tok,
                exact,
                lr,
                norm,
                ms
            );
            window = (0.0, 0);
        }
    }
    if let Some(out) = a.out {
        params.save(&out)?;
        println!("saved {} tensors to {}", params.len(), out.display());
    }
    Ok(())
}
