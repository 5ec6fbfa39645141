//! Influence of training samples x_u on probes x_v: predicted (gradient inner products) and
//! measured (one real step, then the probes' log-probabilities again), with the cosines, the
//! LBK magnitude estimate and the perplexities. Formulas and sign conventions: docs/dynamics.md.
//!
//! Memory: the few training gradients are held (N_u · P f64 values for P selected parameter
//! elements); probes are built, differentiated and dropped one at a time, so thousands of
//! probes cost one probe gradient of memory.

use super::sample::{sample_gradient, sample_stats, Objective, SampleStats};
use super::select::ParamSelector;
use super::step::with_step;
use crate::qwen2_5_vl::QwenVl;
use crate::rl::data::Encoded;
use crate::{Error, Result};
use std::time::Instant;

/// Samples given by index, built on demand (a CLI source loads and preprocesses each image
/// only when asked), so a probe set never has to sit in memory whole.
pub trait SampleSource {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn sample(&self, i: usize) -> Result<Encoded>;
    /// How errors name sample `i`.
    fn label(&self, i: usize) -> String {
        format!("sample {i}")
    }
}

impl SampleSource for [Encoded] {
    fn len(&self) -> usize {
        <[Encoded]>::len(self)
    }
    fn sample(&self, i: usize) -> Result<Encoded> {
        self.get(i)
            .cloned()
            .ok_or_else(|| Error::msg(format!("sample {i} out of range ({})", self.len())))
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct InfluenceOptions {
    /// η of the one SGD step.
    pub lr: f64,
    /// Parameters the gradients cover and the step moves.
    pub selector: ParamSelector,
    /// The training step on x_u: `LogProb` is θ ← θ + η ∇ log π(x_u) (ascent on log π, i.e.
    /// descent on the summed NLL); `SftLoss` is θ ← θ − η ∇ L_SFT(x_u), L_SFT the mean token
    /// cross-entropy (= θ + (η / C_u) ∇ log π(x_u)).
    pub step: Objective,
    /// Also take each step for real and measure the probes' change.
    pub actual: bool,
    /// A progress line on stderr every few seconds.
    pub progress: bool,
}

impl InfluenceOptions {
    pub fn new(lr: f64) -> InfluenceOptions {
        InfluenceOptions {
            lr,
            selector: ParamSelector::all(),
            step: Objective::LogProb,
            actual: false,
            progress: false,
        }
    }
}

/// Wall-clock seconds of each phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub train_gradients_s: f64,
    pub probe_gradients_s: f64,
    pub actual_s: f64,
}

/// Everything measured, indexed `[v][u]` (probe, training sample).
#[derive(Debug, Clone)]
pub struct InfluenceReport {
    pub lr: f64,
    pub step: Objective,
    /// Selected parameter tensors and their total elements P.
    pub num_tensors: usize,
    pub num_params: usize,
    pub train: Vec<SampleStats>,
    pub probes: Vec<SampleStats>,
    /// ‖∇ log π(x_u)‖ and ‖∇ log π(x_v)‖.
    pub train_grad_norms: Vec<f64>,
    pub probe_grad_norms: Vec<f64>,
    /// M[v][u] = ⟨∇ log π(x_v), ∇ log π(x_u)⟩.
    pub inner: Vec<Vec<f64>>,
    /// First-order Δ log π(x_v) | x_u = η · s_u · M[v][u] (s_u = 1, or 1/C_u for the SFT step).
    pub predicted: Vec<Vec<f64>>,
    /// Measured log π(x_v) after the step minus before (with `actual`).
    pub actual: Option<Vec<Vec<f64>>>,
    pub timing: Timing,
}

/// Summary statistics of a set of numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub mean_abs: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(xs: impl IntoIterator<Item = f64>) -> Stats {
        let (mut n, mut sum, mut abs) = (0usize, 0.0, 0.0);
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        for x in xs {
            n += 1;
            sum += x;
            abs += x.abs();
            min = min.min(x);
            max = max.max(x);
        }
        if n == 0 {
            return Stats::default();
        }
        Stats {
            mean: sum / n as f64,
            mean_abs: abs / n as f64,
            min,
            max,
        }
    }
}

impl InfluenceReport {
    pub fn pairs(&self) -> usize {
        self.train.len() * self.probes.len()
    }

    /// s_u: the training step moves θ by η · s_u · ∇ log π(x_u).
    pub fn step_scale(&self, u: usize) -> f64 {
        step_scale(self.step, self.train[u].tokens)
    }

    /// cos(∇ log π(x_v), ∇ log π(x_u)); 0 when either gradient is zero.
    pub fn cosine(&self, v: usize, u: usize) -> f64 {
        let d = self.probe_grad_norms[v] * self.train_grad_norms[u];
        if d > 0.0 {
            self.inner[v][u] / d
        } else {
            0.0
        }
    }

    /// Δ log π(x_v) | x_u: measured when available, else predicted.
    pub fn delta(&self, v: usize, u: usize) -> f64 {
        match &self.actual {
            Some(a) => a[v][u],
            None => self.predicted[v][u],
        }
    }

    /// LBK(v, u) = (Δ/η)² / (‖A(x_v)‖² ‖G(x_u)‖²), G(x_u) = ∂ loss(x_u) / ∂z_u = −s_u A(x_u):
    /// a lower bound on the squared eNTK operator norm ‖K(x_v, x_u)‖² (Δ/η = A K G to first
    /// order), independent of η.
    pub fn lbk(&self, v: usize, u: usize) -> f64 {
        let s = self.step_scale(u);
        let g_sq = s * s * self.train[u].logit_grad_norm_sq;
        let den = self.probes[v].logit_grad_norm_sq * g_sq;
        let d = self.delta(v, u) / self.lr;
        if den > 0.0 {
            d * d / den
        } else {
            0.0
        }
    }

    fn all_pairs<'a>(
        &'a self,
        f: impl Fn(usize, usize) -> f64 + 'a,
    ) -> impl Iterator<Item = f64> + 'a {
        (0..self.probes.len())
            .flat_map(move |v| (0..self.train.len()).map(move |u| (v, u)))
            .map(move |(v, u)| f(v, u))
    }

    pub fn predicted_stats(&self) -> Stats {
        Stats::of(self.all_pairs(|v, u| self.predicted[v][u]))
    }
    pub fn actual_stats(&self) -> Option<Stats> {
        self.actual
            .as_ref()
            .map(|a| Stats::of(self.all_pairs(|v, u| a[v][u])))
    }
    pub fn cosine_stats(&self) -> Stats {
        Stats::of(self.all_pairs(|v, u| self.cosine(v, u)))
    }
    pub fn lbk_stats(&self) -> Stats {
        Stats::of(self.all_pairs(|v, u| self.lbk(v, u)))
    }

    /// Pearson correlation of predicted vs measured Δ over all pairs (with `actual`).
    pub fn correlation(&self) -> Option<f64> {
        let a = self.actual.as_ref()?;
        let p: Vec<f64> = self.predicted.iter().flatten().copied().collect();
        let m: Vec<f64> = a.iter().flatten().copied().collect();
        Some(pearson(&p, &m))
    }

    pub fn train_perplexity(&self) -> f64 {
        perplexity_of(&self.train)
    }
    pub fn probe_perplexity(&self) -> f64 {
        perplexity_of(&self.probes)
    }

    /// Seconds per (u, v) pair for the prediction (all gradients and inner products).
    pub fn predicted_s_per_pair(&self) -> f64 {
        (self.timing.train_gradients_s + self.timing.probe_gradients_s) / self.pairs().max(1) as f64
    }
    /// Seconds per (u, v) pair for the measurement (steps, forwards, restores).
    pub fn actual_s_per_pair(&self) -> f64 {
        self.timing.actual_s / self.pairs().max(1) as f64
    }
}

fn step_scale(step: Objective, tokens: usize) -> f64 {
    match step {
        Objective::LogProb => 1.0,
        Objective::SftLoss => 1.0 / tokens.max(1) as f64,
    }
}

/// exp(mean token NLL) over the completion tokens of all the samples together.
pub fn perplexity_of(stats: &[SampleStats]) -> f64 {
    let tokens: usize = stats.iter().map(|s| s.tokens).sum();
    let logprob: f64 = stats.iter().map(|s| s.logprob).sum();
    if tokens == 0 {
        return f64::NAN;
    }
    (-logprob / tokens as f64).exp()
}

/// Perplexity of a data set under the model: exp of the mean NLL of its completion tokens.
pub fn perplexity<S: SampleSource + ?Sized>(model: &QwenVl, data: &S) -> Result<f64> {
    let stats = (0..data.len())
        .map(|i| {
            let e = data.sample(i)?;
            sample_stats(model, &e).map_err(|err| named(data, i, err))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(perplexity_of(&stats))
}

/// Pearson correlation; NaN when either side is constant or the lengths differ.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return f64::NAN;
    }
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    sab / (saa * sbb).sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn named<S: SampleSource + ?Sized>(source: &S, i: usize, e: Error) -> Error {
    Error::msg(format!("{}: {e}", source.label(i)))
}

/// Prints "dynamics: <phase> i/n" lines at most every few seconds.
struct Progress {
    on: bool,
    start: Instant,
    last: Instant,
}

impl Progress {
    fn new(on: bool) -> Progress {
        let now = Instant::now();
        Progress {
            on,
            start: now,
            last: now,
        }
    }
    fn tick(&mut self, phase: &str, done: usize, total: usize) {
        if !self.on || (self.last.elapsed().as_secs_f64() < 2.0 && done < total) {
            return;
        }
        self.last = Instant::now();
        let t = self.start.elapsed().as_secs_f64();
        eprintln!(
            "dynamics: {phase} {done}/{total} ({t:.1} s, {:.3} s each)",
            t / done.max(1) as f64
        );
    }
}

/// Per-sample gradients of the training samples and probes, their inner products (the
/// prediction), and with `opts.actual` the measured change of every probe after one step on
/// every training sample (θ restored bit-exactly after each).
pub fn influence<T, P>(
    model: &QwenVl,
    train: &T,
    probes: &P,
    opts: &InfluenceOptions,
) -> Result<InfluenceReport>
where
    T: SampleSource + ?Sized,
    P: SampleSource + ?Sized,
{
    if train.is_empty() || probes.is_empty() {
        return Err(Error::msg(format!(
            "influence: need training samples and probes (got {} and {})",
            train.len(),
            probes.len()
        )));
    }
    if !(opts.lr.is_finite() && opts.lr > 0.0) {
        return Err(Error::msg(format!(
            "influence: the learning rate must be positive, got {}",
            opts.lr
        )));
    }
    let selected = opts.selector.resolve(&model.params)?;
    let lr = opts.lr;

    // Training gradients, held.
    let t0 = Instant::now();
    let mut progress = Progress::new(opts.progress);
    let mut train_grads = Vec::with_capacity(train.len());
    let mut train_stats = Vec::with_capacity(train.len());
    for u in 0..train.len() {
        let e = train.sample(u)?;
        let g = sample_gradient(model, &e, &selected, Objective::LogProb)
            .map_err(|err| named(train, u, err))?;
        train_stats.push(g.stats);
        train_grads.push(g.grad);
        progress.tick("train gradients", u + 1, train.len());
    }
    let train_grad_norms: Vec<f64> = train_grads.iter().map(|g| dot(g, g).sqrt()).collect();
    let train_gradients_s = t0.elapsed().as_secs_f64();

    // Probe gradients, streamed: one alive at a time.
    let t1 = Instant::now();
    let mut progress = Progress::new(opts.progress);
    let (mut inner, mut predicted) = (Vec::new(), Vec::new());
    let (mut probe_stats, mut probe_grad_norms) = (Vec::new(), Vec::new());
    for v in 0..probes.len() {
        let e = probes.sample(v)?;
        let g = sample_gradient(model, &e, &selected, Objective::LogProb)
            .map_err(|err| named(probes, v, err))?;
        let row: Vec<f64> = train_grads.iter().map(|gu| dot(&g.grad, gu)).collect();
        predicted.push(
            row.iter()
                .zip(&train_stats)
                .map(|(m, s)| lr * step_scale(opts.step, s.tokens) * m)
                .collect(),
        );
        inner.push(row);
        probe_grad_norms.push(dot(&g.grad, &g.grad).sqrt());
        probe_stats.push(g.stats);
        progress.tick("probe gradients", v + 1, probes.len());
    }
    let probe_gradients_s = t1.elapsed().as_secs_f64();

    // Measured: one step per training sample, every probe re-scored, θ restored.
    let t2 = Instant::now();
    let actual = if opts.actual {
        let mut progress = Progress::new(opts.progress);
        // Before-step log-probabilities from the same no-grad forward as the after-step ones.
        let base = (0..probes.len())
            .map(|v| {
                let e = probes.sample(v)?;
                sample_stats(model, &e)
                    .map(|s| s.logprob)
                    .map_err(|err| named(probes, v, err))
            })
            .collect::<Result<Vec<f64>>>()?;
        let mut actual = vec![vec![0.0; train.len()]; probes.len()];
        for (u, g) in train_grads.iter().enumerate() {
            let scaled_lr = lr * step_scale(opts.step, train_stats[u].tokens);
            with_step(&selected, g, scaled_lr, || {
                for v in 0..probes.len() {
                    let e = probes.sample(v)?;
                    let after = sample_stats(model, &e).map_err(|err| named(probes, v, err))?;
                    actual[v][u] = after.logprob - base[v];
                }
                Ok(())
            })
            .map_err(|err| Error::msg(format!("step on {}: {err}", train.label(u))))?;
            progress.tick("measured steps", u + 1, train.len());
        }
        Some(actual)
    } else {
        None
    };
    let actual_s = if opts.actual {
        t2.elapsed().as_secs_f64()
    } else {
        0.0
    };

    Ok(InfluenceReport {
        lr,
        step: opts.step,
        num_tensors: selected.tensors.len(),
        num_params: selected.numel,
        train: train_stats,
        probes: probe_stats,
        train_grad_norms,
        probe_grad_norms,
        inner,
        predicted,
        actual,
        timing: Timing {
            train_gradients_s,
            probe_gradients_s,
            actual_s,
        },
    })
}

/// The learning-dynamics numbers the study reports per arm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArmDynamics {
    /// Perplexity of the arm's training data under the model (the alignment proxy).
    pub train_perplexity: f64,
    pub probe_perplexity: f64,
    /// Mean and mean |·| of the predicted Δ log π(probe) over (train, probe) pairs.
    pub mean_influence: f64,
    pub mean_abs_influence: f64,
    pub mean_cosine: f64,
    /// Mean LBK (from the predicted Δ).
    pub lbk: f64,
}

/// Influence of an arm's training samples on prior-knowledge probes, first order only
/// (no steps taken): see `influence`. `lr` is η of θ ← θ + η ∇ log π(x_u).
pub fn arm_summary(
    model: &QwenVl,
    train: &[Encoded],
    probes: &[Encoded],
    lr: f64,
    selector: &ParamSelector,
) -> Result<ArmDynamics> {
    let opts = InfluenceOptions {
        selector: selector.clone(),
        ..InfluenceOptions::new(lr)
    };
    let r = influence(model, train, probes, &opts)?;
    let p = r.predicted_stats();
    Ok(ArmDynamics {
        train_perplexity: r.train_perplexity(),
        probe_perplexity: r.probe_perplexity(),
        mean_influence: p.mean,
        mean_abs_influence: p.mean_abs,
        mean_cosine: r.cosine_stats().mean,
        lbk: r.lbk_stats().mean,
    })
}
