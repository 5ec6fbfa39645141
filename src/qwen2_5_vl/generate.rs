//! Batched generation with a KV cache.
//!
//! Prefill runs the left-padded prompts through the model once (vision tower, `get_rope_index`
//! positions, attention mask) and keeps every layer's keys (after rope) and values
//! [B, KV, T, head_dim]. Each decode step then feeds one token per unfinished row: its keys and
//! values are appended to the cache and its query attends to all of them (the causal mask is
//! bottom-right aligned, the key mask hides the left padding).
//!
//! Decode positions follow transformers 5.x `generate`: the position ids of the prompt are
//! extended by one per new token from each row's last prompt position, on all three M-RoPE
//! axes (`_update_model_kwargs_for_generation`: `position_ids[..., -1:] + 1`). A prompt ending
//! in text has its last position at max, so the n-th new token (from 0) of row b gets
//! `prompt_tokens_b + rope_delta_b + n` — padding is not counted.
//!
//! Rows that emit a stop id leave the batch (their cache rows are dropped, and columns that are
//! padding in every remaining row are trimmed), so a batch costs what its live rows cost.
//! Sampling draws from one `Rng` in row order at every step: a seed gives the same output.

use super::model::{Batch, LayerKv, QwenVl};
use super::rope::{mrope_tables, Positions};
use crate::{DType, Error, NoGradGuard, Result, Rng, Tensor};

/// How tokens are chosen. `temperature` 0 is greedy (argmax; `top_k`/`top_p` unused);
/// otherwise logits / temperature, then top-k, then top-p (nucleus, as transformers'
/// `TopPLogitsWarper`), then a draw from the softmax of what is left.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0.0 = greedy.
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f64,
    /// A row ends after it emits one of these.
    pub stop_ids: Vec<u32>,
}

impl Default for SamplingConfig {
    /// Greedy, 64 new tokens, no stop ids.
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            stop_ids: Vec::new(),
        }
    }
}

impl SamplingConfig {
    /// Greedy decoding of up to `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingConfig {
            max_new_tokens,
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::msg(format!(
                "sampling: temperature must be >= 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::msg(format!(
                "sampling: top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// One prompt: token ids (images already expanded to their `<|image_pad|>` runs) and the
/// pixels of its images, in the order their runs appear.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub input_ids: Vec<u32>,
    /// [N, patch_dim] (1176 for Qwen2.5-VL), f32, for this prompt's images.
    pub pixel_values: Option<Tensor>,
    pub image_grid_thw: Vec<[usize; 3]>,
}

impl Prompt {
    /// A prompt without images.
    pub fn text(input_ids: Vec<u32>) -> Prompt {
        Prompt {
            input_ids,
            pixel_values: None,
            image_grid_thw: Vec::new(),
        }
    }
}

/// The continuation of one prompt.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Generation {
    /// Generated tokens only, including the stop token when one was emitted.
    pub tokens: Vec<u32>,
    /// True when a stop token ended it (false: max_new_tokens reached).
    pub finished: bool,
}

/// The decoding state of a batch of rows.
pub struct KvCache {
    /// Per decoder layer: keys (after rope) and values [B, KV, T, head_dim].
    pub layers: Vec<LayerKv>,
    /// [B, T] row-major: 1 for a token, 0 for left padding.
    pub key_padding: Vec<i64>,
    /// Per row: the (T, H, W) position ids the next token gets.
    pub next_positions: Vec<[i64; 3]>,
}

impl KvCache {
    /// Rows.
    pub fn batch(&self) -> usize {
        self.next_positions.len()
    }

    /// Cached tokens per row, padding included (T).
    pub fn len(&self) -> usize {
        self.key_padding
            .len()
            .checked_div(self.batch())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps `rows` (indices into the current batch, in the order given), then drops the
    /// leading columns that are padding in every kept row.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let (b, t) = (self.batch(), self.len());
        if let Some(&bad) = rows.iter().find(|&&r| r >= b) {
            return Err(Error::msg(format!(
                "kv cache: row {bad} out of range for a batch of {b}"
            )));
        }
        let trim = rows
            .iter()
            .map(|&r| {
                self.key_padding[r * t..(r + 1) * t]
                    .iter()
                    .take_while(|&&m| m == 0)
                    .count()
            })
            .min()
            .unwrap_or(0);
        let index = Tensor::from_vec(
            rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
            &[rows.len()],
        )?;
        let keep = |x: &Tensor| -> Result<Tensor> {
            let x = if rows.len() == b && rows.iter().enumerate().all(|(i, &r)| i == r) {
                x.clone()
            } else {
                x.index_select(&index, 0)?
            };
            if trim > 0 {
                x.narrow(2, trim, t - trim)
            } else {
                Ok(x)
            }
        };
        for layer in &mut self.layers {
            layer.keys = keep(&layer.keys)?;
            layer.values = keep(&layer.values)?;
        }
        self.key_padding = rows
            .iter()
            .flat_map(|&r| self.key_padding[r * t + trim..(r + 1) * t].iter().copied())
            .collect();
        self.next_positions = rows.iter().map(|&r| self.next_positions[r]).collect();
        Ok(())
    }
}

/// An id for left padding: any id works (padding is masked) except the image token, which the
/// embedding would try to fill with image features. Qwen's `<|endoftext|>` plays this role in
/// transformers; the tiny configs have no such field, so 0 (or 1) it is.
fn pad_id(model: &QwenVl) -> i64 {
    if model.config.image_token_id == 0 {
        1
    } else {
        0
    }
}

/// The prompts as one left-padded batch: input_ids and attention_mask I64 [B, T], the images
/// of all prompts concatenated in prompt order.
pub fn pad_prompts(model: &QwenVl, prompts: &[Prompt]) -> Result<Batch> {
    let seq = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
    if let Some(i) = prompts.iter().position(|p| p.input_ids.is_empty()) {
        return Err(Error::msg(format!("generate: prompt {i} has no tokens")));
    }
    let pad = pad_id(model);
    let mut ids = Vec::with_capacity(prompts.len() * seq);
    let mut mask = Vec::with_capacity(prompts.len() * seq);
    for p in prompts {
        let n_pad = seq - p.input_ids.len();
        ids.extend(std::iter::repeat_n(pad, n_pad));
        ids.extend(p.input_ids.iter().map(|&i| i as i64));
        mask.extend(std::iter::repeat_n(0i64, n_pad));
        mask.extend(std::iter::repeat_n(1i64, p.input_ids.len()));
    }
    let mut pixels = Vec::new();
    let mut grids = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let rows: usize = p.image_grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum();
        match &p.pixel_values {
            Some(px) if px.rank() == 2 && px.dim(0)? == rows => {
                pixels.push(px.to_dtype(DType::F32)?)
            }
            Some(px) => {
                return Err(Error::shape(
                    "generate",
                    format!(
                    "prompt {i}: pixel_values {:?} do not match image_grid_thw {:?} ({rows} rows)",
                    px.shape(),
                    p.image_grid_thw
                ),
                ))
            }
            None if !p.image_grid_thw.is_empty() => {
                return Err(Error::msg(format!(
                    "generate: prompt {i} has image grids {:?} but no pixel_values",
                    p.image_grid_thw
                )))
            }
            None => {}
        }
        grids.extend_from_slice(&p.image_grid_thw);
    }
    let pixel_values = match pixels.len() {
        0 => None,
        1 => pixels.pop(),
        _ => Some(Tensor::cat(&pixels.iter().collect::<Vec<_>>(), 0)?),
    };
    Ok(Batch {
        input_ids: Some(Tensor::from_vec(ids, &[prompts.len(), seq])?),
        attention_mask: Some(Tensor::from_vec(mask, &[prompts.len(), seq])?),
        pixel_values,
        image_grid_thw: grids,
        labels: None,
    })
}

/// Runs the prompts through the model once (no graph is recorded). Returns the logits of each
/// row's last token [B, V] and the cache to decode from.
pub fn prefill(model: &QwenVl, prompts: &[Prompt]) -> Result<(Tensor, KvCache)> {
    let _no_grad = NoGradGuard::new();
    let batch = pad_prompts(model, prompts)?;
    let x = model.decoder_inputs(&batch)?;
    let (b, seq) = (x.positions.batch, x.positions.seq);
    let mut layers = Vec::with_capacity(model.config.text.num_hidden_layers);
    let h = model.decoder(
        x.hidden,
        &x.cos,
        &x.sin,
        x.key_padding.as_ref(),
        Some(&mut layers),
    )?;
    // Left padding: every row's last token is in the last column.
    let logits = model.head(&h.narrow(1, seq - 1, 1)?)?;
    let v = logits.dim(2)?;
    let axes = &x.positions.axes;
    let last = |r: usize| r * seq + seq - 1;
    let cache = KvCache {
        layers,
        key_padding: batch
            .attention_mask
            .as_ref()
            .map(|m| m.to_vec::<i64>())
            .transpose()?
            .unwrap_or_else(|| vec![1; b * seq]),
        next_positions: (0..b)
            .map(|r| {
                [
                    axes[0][last(r)] + 1,
                    axes[1][last(r)] + 1,
                    axes[2][last(r)] + 1,
                ]
            })
            .collect(),
    };
    Ok((logits.reshape(&[b, v])?, cache))
}

/// Feeds one token per cached row and returns the logits for the token after it [B, V].
pub fn decode_step(model: &QwenVl, cache: &mut KvCache, tokens: &[u32]) -> Result<Tensor> {
    let _no_grad = NoGradGuard::new();
    let (b, t) = (cache.batch(), cache.len());
    if tokens.len() != b {
        return Err(Error::shape(
            "decode_step",
            format!("{} tokens for a cache of {b} rows", tokens.len()),
        ));
    }
    let table = model.params.require("model.embed_tokens.weight")?;
    // A generated image token is embedded as a plain token, as transformers does when no
    // pixel_values come with the step.
    let ids = Tensor::from_vec(
        tokens.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        &[b, 1],
    )?;
    let hidden = Tensor::embedding(&ids, table)?;
    let positions = Positions {
        axes: [0, 1, 2].map(|a| cache.next_positions.iter().map(|p| p[a]).collect()),
        batch: b,
        seq: 1,
        rope_deltas: Vec::new(),
    };
    let (cos, sin) = mrope_tables(&model.config.text, &positions, hidden.dtype())?;
    let device = hidden.device();
    let mut key_padding = Vec::with_capacity(b * (t + 1));
    for row in cache.key_padding.chunks(t.max(1)).take(b) {
        key_padding.extend_from_slice(&row[..t]);
        key_padding.push(1);
    }
    // On the host, where attention reads it (see `DecoderInputs::key_padding`).
    let mask = Tensor::from_vec(key_padding.clone(), &[b, t + 1])?;
    let h = model.decoder(
        hidden,
        &cos.to_device(device)?,
        &sin.to_device(device)?,
        Some(&mask),
        Some(&mut cache.layers),
    )?;
    cache.key_padding = key_padding;
    for p in &mut cache.next_positions {
        for axis in p.iter_mut() {
            *axis += 1;
        }
    }
    let logits = model.head(&h)?;
    let v = logits.dim(2)?;
    logits.reshape(&[b, v])
}

/// Index of the largest value (the first on ties; NaN never wins).
fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || xs[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Picks the next token from one row of logits (see [`SamplingConfig`]). Draws one
/// `rng.uniform()` unless greedy.
pub fn sample_token(logits: &[f64], cfg: &SamplingConfig, rng: &mut Rng) -> Result<u32> {
    if logits.is_empty() {
        return Err(Error::msg("sample_token: empty logits"));
    }
    Ok(sample_with(logits, cfg, draw(cfg, rng)))
}

/// The uniform a row's sampling uses: one `rng.uniform()`, none when greedy.
fn draw(cfg: &SamplingConfig, rng: &mut Rng) -> f64 {
    if cfg.temperature == 0.0 {
        0.0
    } else {
        rng.uniform()
    }
}

/// `sample_token` with its uniform draw `u` in [0, 1) given (unused when greedy), so that rows
/// can be sampled in parallel from draws taken in row order. `logits` is not empty.
fn sample_with(logits: &[f64], cfg: &SamplingConfig, u: f64) -> u32 {
    if cfg.temperature == 0.0 {
        return argmax(logits) as u32;
    }
    let mut scores: Vec<f64> = logits
        .iter()
        .map(|&x| {
            if x.is_nan() {
                f64::NEG_INFINITY
            } else {
                x / cfg.temperature
            }
        })
        .collect();
    let v = scores.len();
    // Top-k (TopKLogitsWarper): drop everything below the k-th largest score (ties stay).
    if cfg.top_k > 0 && cfg.top_k < v {
        // The k-th largest by selection (O(V)), the value a full sort puts there.
        let mut sorted = scores.clone();
        let (_, &mut kth, _) = sorted.select_nth_unstable_by(cfg.top_k - 1, |a, b| b.total_cmp(a));
        for s in scores.iter_mut().filter(|s| **s < kth) {
            *s = f64::NEG_INFINITY;
        }
    }
    // Top-p (TopPLogitsWarper): in ascending order, drop tokens while the cumulative
    // probability stays <= 1 − top_p; the most likely token always stays.
    if cfg.top_p < 1.0 {
        // Only the finite scores are ordered (after top-k, k of them): the −inf ones would come
        // first in the ascending order, add exactly 0 to the cumulative probability, and be
        // dropped again, so the decisions and their arithmetic are those of ordering them all
        // (a stable sort keeps ties in index order either way).
        let mut order: Vec<usize> = (0..v).filter(|&i| scores[i] > f64::NEG_INFINITY).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let max = order.last().map_or(f64::NEG_INFINITY, |&i| scores[i]);
        let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        let mut cumulative = 0.0;
        for &i in &order[..order.len().saturating_sub(1)] {
            cumulative += (scores[i] - max).exp() / total;
            if cumulative <= 1.0 - cfg.top_p {
                scores[i] = f64::NEG_INFINITY;
            } else {
                break;
            }
        }
    }
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_kept = argmax(&scores);
    for (i, w) in weights.iter().enumerate() {
        if *w > 0.0 {
            cumulative += w;
            last_kept = i;
            if target < cumulative {
                return i as u32;
            }
        }
    }
    last_kept as u32
}

/// Continues every prompt (batched, KV cache, no graph): see the module doc. Returns one
/// `Generation` per prompt, in order.
pub fn generate(
    model: &QwenVl,
    prompts: &[Prompt],
    cfg: &SamplingConfig,
    rng: &mut Rng,
) -> Result<Vec<Generation>> {
    generate_groups(model, prompts, 1, cfg, rng)
}

/// `generate` of every prompt `group` times: generations [prompt 0 × group, prompt 1 × group,
/// ...], the tokens `generate` gives for the prompts repeated so. Each prompt runs through the
/// model once and its cache rows and last logits are repeated (GRPO's rollouts: repeating the
/// prompts ran each image through the vision tower `group` times).
pub fn generate_groups(
    model: &QwenVl,
    prompts: &[Prompt],
    group: usize,
    cfg: &SamplingConfig,
    rng: &mut Rng,
) -> Result<Vec<Generation>> {
    cfg.validate()?;
    let n = prompts.len() * group;
    let mut out = vec![Generation::default(); n];
    if n == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let _no_grad = NoGradGuard::new();
    let (mut logits, mut cache) = prefill(model, prompts)?;
    if group > 1 {
        let rows: Vec<usize> = (0..prompts.len())
            .flat_map(|p| std::iter::repeat_n(p, group))
            .collect();
        cache.select_rows(&rows)?;
        let index = Tensor::from_vec(rows.iter().map(|&r| r as i64).collect(), &[n])?;
        logits = logits.index_select(&index, 0)?;
    }
    // active[r] = the generation that cache row r continues.
    let mut active: Vec<usize> = (0..n).collect();
    loop {
        let v = logits.dim(1)?;
        if v == 0 {
            return Err(Error::msg("generate: the model gave empty logits"));
        }
        let values = logits.to_f64s()?;
        // One draw a row, in row order (as `sample_token` row by row), then the rows in
        // parallel: with a real vocabulary (152k), sampling a batch on one core can take longer
        // than the device's decode step.
        let draws: Vec<f64> = active.iter().map(|_| draw(cfg, rng)).collect();
        let tokens: Vec<u32> = {
            use rayon::prelude::*;
            draws
                .par_iter()
                .enumerate()
                .map(|(r, &u)| sample_with(&values[r * v..(r + 1) * v], cfg, u))
                .collect()
        };
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (r, (&p, &token)) in active.iter().zip(&tokens).enumerate() {
            let g = &mut out[p];
            g.tokens.push(token);
            if cfg.stop_ids.contains(&token) {
                g.finished = true;
            } else if g.tokens.len() < cfg.max_new_tokens {
                keep.push(r);
                next.push(token);
            }
        }
        if keep.is_empty() {
            return Ok(out);
        }
        if keep.len() < active.len() {
            cache.select_rows(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
        }
        logits = decode_step(model, &mut cache, &next)?;
    }
}
