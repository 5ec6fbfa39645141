//! From examples (image, question, answer) to model batches.
//!
//! An example becomes the Qwen2.5-VL chat prompt (`<|im_start|>user ... <|im_start|>assistant\n`)
//! followed by the assistant's answer and `<|im_end|>`; only the answer tokens (and the closing
//! `<|im_end|>`) carry labels, so SFT learns the answer and nothing else.
//!
//! Batches are laid out as TRL lays out rollouts: prompts left-padded to a common length P,
//! completions right-padded after them. Every row's completion then starts at column P, so the
//! completion log-probabilities of the whole batch are one slice of the logits.

use crate::qwen2_5_vl::config::Config;
use crate::qwen2_5_vl::model::{Batch, QwenVl};
use crate::qwen2_5_vl::preprocess::{preprocess_image, PreprocessConfig};
use crate::qwen2_5_vl::tokenizer::QwenTokenizer;
use crate::{DType, Error, Result, Tensor};
use image::{DynamicImage, RgbImage};

/// One supervised example.
#[derive(Debug, Clone)]
pub struct Example {
    pub image: Option<RgbImage>,
    pub question: String,
    pub answer: String,
}

/// A tokenized prompt with its preprocessed image, plus (optionally) a completion.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Prompt tokens followed by completion tokens.
    pub input_ids: Vec<u32>,
    /// Number of prompt tokens at the start of `input_ids`.
    pub prompt_len: usize,
    /// `[N, 1176]` F32 for the prompt's image, if it has one.
    pub pixel_values: Option<Tensor>,
    pub image_grid_thw: Vec<[usize; 3]>,
}

impl Encoded {
    pub fn completion(&self) -> &[u32] {
        &self.input_ids[self.prompt_len..]
    }

    /// The same prompt with `completion` in place of the current one.
    pub fn with_completion(&self, completion: &[u32]) -> Encoded {
        let mut input_ids = self.input_ids[..self.prompt_len].to_vec();
        input_ids.extend_from_slice(completion);
        Encoded {
            input_ids,
            prompt_len: self.prompt_len,
            pixel_values: self.pixel_values.clone(),
            image_grid_thw: self.image_grid_thw.clone(),
        }
    }
}

/// Tokenizer + image preprocessing for one model.
pub struct Encoder {
    pub tokenizer: QwenTokenizer,
    pub preprocess: PreprocessConfig,
}

impl Encoder {
    pub fn new(tokenizer: QwenTokenizer, config: &Config) -> Encoder {
        let preprocess = PreprocessConfig {
            patch_size: config.vision.patch_size,
            temporal_patch_size: config.vision.temporal_patch_size,
            merge_size: config.vision.spatial_merge_size,
            ..PreprocessConfig::default()
        };
        Encoder {
            tokenizer,
            preprocess,
        }
    }

    /// The generation prompt for a question about an optional image.
    pub fn prompt(&self, image: Option<&RgbImage>, question: &str) -> Result<Encoded> {
        let (pixel_values, grids) = match image {
            Some(img) => {
                let p = preprocess_image(&DynamicImage::ImageRgb8(img.clone()), &self.preprocess)?;
                (Some(p.pixel_values), vec![p.grid_thw])
            }
            None => (None, vec![]),
        };
        let input_ids =
            self.tokenizer
                .encode_user_prompt(&grids, question, self.preprocess.merge_size)?;
        Ok(Encoded {
            prompt_len: input_ids.len(),
            input_ids,
            pixel_values,
            image_grid_thw: grids,
        })
    }

    /// The tokens of an assistant answer, closed by `<|im_end|>`.
    pub fn answer_tokens(&self, answer: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(answer)?;
        ids.push(self.tokenizer.special().im_end);
        Ok(ids)
    }

    /// Prompt + answer, the answer being the completion.
    pub fn example(&self, ex: &Example) -> Result<Encoded> {
        let prompt = self.prompt(ex.image.as_ref(), &ex.question)?;
        Ok(prompt.with_completion(&self.answer_tokens(&ex.answer)?))
    }

    /// Completion text without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true)
    }

    pub fn pad_id(&self) -> u32 {
        self.tokenizer.special().endoftext
    }
}

/// A collated batch and where its completions sit.
pub struct Collated {
    pub batch: Batch,
    /// Column where every row's completion starts (the padded prompt length).
    pub prompt_cols: usize,
    /// Completion columns (the longest completion).
    pub completion_cols: usize,
    /// `[B, completion_cols]` F32: 1 for a completion token, 0 for padding.
    pub completion_mask: Tensor,
}

/// Padded-token cost charged per extra sub-batch in [`length_groups`]: what one more forward
/// and backward costs beyond its tokens (op launches, the vision tower's fixed work). On the
/// tiny preset a step of 32 examples runs about 0.1 ms per padded token on 2 cores and a
/// sub-batch's fixed cost is of the order of 20 ms.
pub const GROUP_OVERHEAD_TOKENS: usize = 256;

/// Splits examples into at most `max_groups` sub-batches by length, so that short examples
/// are not padded to the longest one of the batch. The examples are sorted by (prompt,
/// completion) length and cut into contiguous runs minimising the padded tokens
/// (`rows x (longest prompt + longest completion)`) plus `overhead` per run, by dynamic
/// programming. Returns indices into `items`, shortest run first; `max_groups <= 1` gives
/// one run in the original order.
pub fn length_groups(items: &[Encoded], max_groups: usize, overhead: usize) -> Vec<Vec<usize>> {
    let n = items.len();
    if max_groups <= 1 || n <= 1 {
        return vec![(0..n).collect()];
    }
    let dims = |i: usize| {
        let e = &items[i];
        (e.prompt_len, e.input_ids.len() - e.prompt_len)
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| {
        let (p, c) = dims(i);
        (p + c, p, i)
    });
    // cost[i][j]: padded tokens of the run order[i..j].
    let mut cost = vec![vec![0usize; n + 1]; n + 1];
    for (i, row) in cost.iter_mut().enumerate().take(n) {
        let (mut p, mut c) = (0, 0);
        for (j, &o) in order.iter().enumerate().skip(i) {
            let (pj, cj) = dims(o);
            (p, c) = (p.max(pj), c.max(cj));
            row[j + 1] = (j + 1 - i) * (p + c) + overhead;
        }
    }
    // best[g][j]: cheapest split of order[..j] into g runs; cut[g][j]: where the last starts.
    let groups = max_groups.min(n);
    let mut best = vec![vec![usize::MAX; n + 1]; groups + 1];
    let mut cut = vec![vec![0usize; n + 1]; groups + 1];
    best[0][0] = 0;
    for g in 1..=groups {
        for j in 1..=n {
            for i in (g - 1)..j {
                if best[g - 1][i] == usize::MAX {
                    continue;
                }
                let c = best[g - 1][i] + cost[i][j];
                if c < best[g][j] {
                    (best[g][j], cut[g][j]) = (c, i);
                }
            }
        }
    }
    let g_best = (1..=groups).min_by_key(|&g| (best[g][n], g)).unwrap_or(1);
    let mut runs = Vec::with_capacity(g_best);
    let (mut g, mut j) = (g_best, n);
    while g > 0 {
        let i = cut[g][j];
        runs.push(order[i..j].to_vec());
        (g, j) = (g - 1, i);
    }
    runs.reverse();
    runs
}

/// Prompts left-padded, completions right-padded after them (see the module doc). `labels`
/// are the completion tokens (-100 elsewhere), so `QwenVl::forward` gives the SFT loss.
pub fn collate(items: &[&Encoded], pad_id: u32) -> Result<Collated> {
    if items.is_empty() {
        return Err(Error::msg("collate: no examples"));
    }
    let p = items.iter().map(|e| e.prompt_len).max().unwrap_or(0);
    let c = items
        .iter()
        .map(|e| e.input_ids.len() - e.prompt_len)
        .max()
        .unwrap_or(0);
    let (b, t) = (items.len(), p + c);
    let mut ids = vec![pad_id as i64; b * t];
    let mut mask = vec![0i64; b * t];
    let mut labels = vec![-100i64; b * t];
    let mut cmask = vec![0f32; b * c];
    let mut pixels = Vec::new();
    let mut grids = Vec::new();
    for (r, e) in items.iter().enumerate() {
        let row = r * t;
        let start = p - e.prompt_len;
        for (j, &id) in e.input_ids.iter().enumerate() {
            ids[row + start + j] = id as i64;
            mask[row + start + j] = 1;
        }
        for (j, &id) in e.completion().iter().enumerate() {
            labels[row + p + j] = id as i64;
            cmask[r * c + j] = 1.0;
        }
        if let Some(px) = &e.pixel_values {
            pixels.push(px);
        }
        grids.extend_from_slice(&e.image_grid_thw);
    }
    let pixel_values = if pixels.is_empty() {
        None
    } else {
        Some(Tensor::cat(&pixels, 0)?)
    };
    Ok(Collated {
        batch: Batch {
            input_ids: Some(Tensor::from_vec(ids, &[b, t])?),
            attention_mask: Some(Tensor::from_vec(mask, &[b, t])?),
            pixel_values,
            image_grid_thw: grids,
            labels: Some(Tensor::from_vec(labels, &[b, t])?),
        },
        prompt_cols: p,
        completion_cols: c,
        completion_mask: Tensor::from_vec(cmask, &[b, c])?,
    })
}

/// Logits at the positions that predict the completion tokens, `[B, completion_cols, V]` F32.
/// Differentiable.
pub fn completion_logits(model: &QwenVl, c: &Collated) -> Result<Tensor> {
    if c.prompt_cols == 0 {
        return Err(Error::msg(
            "completion_logits: the prompt is empty (nothing predicts the first token)",
        ));
    }
    let batch = Batch {
        input_ids: c.batch.input_ids.clone(),
        attention_mask: c.batch.attention_mask.clone(),
        pixel_values: c.batch.pixel_values.clone(),
        image_grid_thw: c.batch.image_grid_thw.clone(),
        labels: None,
    };
    model
        .logits_at(&batch, c.prompt_cols - 1, c.completion_cols)?
        .to_dtype(DType::F32)
}

/// log π(token) of every completion column, `[B, completion_cols]` F32 (padding columns hold
/// the log-probability of the pad token; mask them with `completion_mask`), under the policy
/// that sampled them at `temperature`: the logits divided by the temperature before the
/// softmax, as TRL's GRPO computes its per-token log-probabilities, so that the ratio, the KL
/// and the gradient are those of the distribution the rollouts came from. Temperature 0
/// (greedy) or 1: the plain log π. Differentiable.
pub fn policy_logprobs(model: &QwenVl, c: &Collated, temperature: f64) -> Result<Tensor> {
    logprobs_of(&tempered(completion_logits(model, c)?, temperature)?, c)
}

/// `logits / temperature`, unchanged for temperature 0 (greedy) or 1.
pub fn tempered(logits: Tensor, temperature: f64) -> Result<Tensor> {
    if temperature > 0.0 && temperature != 1.0 {
        logits.mul_scalar(1.0 / temperature)
    } else {
        Ok(logits)
    }
}

/// log π of the completion tokens from logits `completion_logits` gave for `c`.
pub fn logprobs_of(logits: &Tensor, c: &Collated) -> Result<Tensor> {
    let ids = c
        .batch
        .input_ids
        .as_ref()
        .ok_or_else(|| Error::msg("logprobs_of: no input_ids"))?;
    let targets = ids
        .narrow(1, c.prompt_cols, c.completion_cols)?
        .to_device(logits.device())?;
    logits.log_prob_of(&targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(prompt: usize, completion: usize) -> Encoded {
        Encoded {
            input_ids: vec![7; prompt + completion],
            prompt_len: prompt,
            pixel_values: None,
            image_grid_thw: vec![],
        }
    }

    fn padded(items: &[Encoded], runs: &[Vec<usize>], overhead: usize) -> usize {
        runs.iter()
            .map(|r| {
                let p = r.iter().map(|&i| items[i].prompt_len).max().unwrap();
                let c = r
                    .iter()
                    .map(|&i| items[i].completion().len())
                    .max()
                    .unwrap();
                r.len() * (p + c) + overhead
            })
            .sum()
    }

    #[test]
    fn length_groups_cover_every_example_once_and_cut_padding() {
        // The tiny preset's shape: many ~33-token examples, a few short and a few long ones.
        let mut items = Vec::new();
        for i in 0..32 {
            items.push(match i % 11 {
                0 => item(62, 7),
                1 | 2 => item(18, 3),
                3 => item(38, 4),
                _ => item(30, 3),
            });
        }
        let one = length_groups(&items, 1, 256);
        assert_eq!(one, vec![(0..32).collect::<Vec<_>>()]);
        let runs = length_groups(&items, 4, 256);
        let mut seen: Vec<usize> = runs.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..32).collect::<Vec<_>>());
        assert!(runs.len() > 1 && runs.len() <= 4, "{runs:?}");
        assert!(padded(&items, &runs, 256) < padded(&items, &one, 256));
        // Shortest run first; the long examples share a run.
        let longest = runs.last().unwrap();
        assert!([0, 11, 22].iter().all(|i| longest.contains(i)), "{runs:?}");
        // A huge overhead keeps one run; equal lengths never split.
        assert_eq!(length_groups(&items, 4, 1 << 20).len(), 1);
        let same: Vec<Encoded> = (0..9).map(|_| item(20, 5)).collect();
        assert_eq!(length_groups(&same, 4, 1).len(), 1);
        assert_eq!(length_groups(&[], 4, 1), vec![Vec::<usize>::new()]);
    }
}
