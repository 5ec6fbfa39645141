//! `QwenVl` = transformers' Qwen2_5_VLForConditionalGeneration: embeddings (+ image features scattered into the image
//! tokens), M-RoPE decoder with GQA, final norm, lm_head, HF loss.

use super::config::Config;
use super::rope::{mrope_tables, rope_index};
use super::vision::vision_forward;
use super::weights;
use crate::nn::Params;
use crate::ops::attention::AttentionOptions;
use crate::{DType, Error, Result, Rng, Tensor};
use std::path::Path;

pub struct QwenVl {
    pub config: Config,
    pub params: Params,
}

/// A batch. `input_ids` I64 [B, T]; `attention_mask` I64 [B, T] (1 = token, 0 = padding);
/// `pixel_values` [N, C·tp·p·p] with one grid [t, h, w] per image (in the order the images'
/// token runs appear, row by row); `labels` I64 [B, T] (-100 = ignored; shifted inside).
#[derive(Default)]
pub struct Batch {
    pub input_ids: Option<Tensor>,
    pub attention_mask: Option<Tensor>,
    pub pixel_values: Option<Tensor>,
    pub image_grid_thw: Vec<[usize; 3]>,
    pub labels: Option<Tensor>,
}

pub struct Output {
    /// [B, T, V]
    pub logits: Tensor,
    /// Mean cross-entropy of the shifted labels (when labels were given).
    pub loss: Option<Tensor>,
    /// Per row: max position + 1 − tokens (for decoding with a KV cache).
    pub rope_deltas: Vec<i64>,
}

impl QwenVl {
    /// Loads config.json and the weights from a model directory (parameters in `dtype`).
    pub fn load(dir: &Path, dtype: DType) -> Result<QwenVl> {
        let config = Config::from_file(dir.join("config.json"))?;
        let params = weights::load_params(dir, &config, dtype)?;
        Ok(QwenVl { config, params })
    }

    pub fn random(config: Config, dtype: DType, rng: &mut Rng) -> Result<QwenVl> {
        let params = weights::random_params(&config, dtype, rng)?;
        Ok(QwenVl { config, params })
    }

    /// The model with its parameters on `device` (new leaves).
    pub fn to_device(&self, device: crate::Device) -> Result<QwenVl> {
        Ok(QwenVl {
            config: self.config.clone(),
            params: self.params.to_device(device)?,
        })
    }

    /// Where the parameters live.
    pub fn device(&self) -> crate::Device {
        self.params
            .iter()
            .next()
            .map(|(_, t)| t.device())
            .unwrap_or(crate::Device::Cpu)
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        self.params.require(name)
    }

    pub fn lm_head(&self) -> Result<&Tensor> {
        if self.config.tie_word_embeddings {
            self.p("model.embed_tokens.weight")
        } else {
            self.p("lm_head.weight")
        }
    }

    /// Token embeddings with the image features in place of the image tokens: [B, T, D].
    pub fn embed(&self, batch: &Batch) -> Result<Tensor> {
        let ids = batch
            .input_ids
            .as_ref()
            .ok_or_else(|| Error::msg("forward: input_ids are required"))?;
        let e = Tensor::embedding(ids, self.p("model.embed_tokens.weight")?)?;
        let n_img = ids
            .to_vec::<i64>()?
            .iter()
            .filter(|&&i| i == self.config.image_token_id)
            .count();
        let Some(pixels) = &batch.pixel_values else {
            if n_img > 0 {
                return Err(Error::msg(format!(
                    "input_ids contain {n_img} image tokens but no pixel_values were given"
                )));
            }
            return Ok(e);
        };
        let feats = vision_forward(
            &self.params,
            &self.config.vision,
            pixels,
            &batch.image_grid_thw,
        )?;
        if feats.dim(0)? != n_img {
            return Err(Error::msg(format!(
                "image features and image tokens do not match: tokens {n_img}, features {}",
                feats.dim(0)?
            )));
        }
        let mask = Tensor::from_vec(
            ids.to_vec::<i64>()?
                .iter()
                .map(|&i| (i == self.config.image_token_id) as u32)
                .collect::<Vec<_>>(),
            &[ids.dim(0)?, ids.dim(1)?, 1],
        )?;
        e.masked_scatter(&mask, &feats.to_dtype(e.dtype())?)
    }

    pub fn forward(&self, batch: &Batch) -> Result<Output> {
        let c = &self.config;
        let t = &c.text;
        let ids = batch
            .input_ids
            .as_ref()
            .ok_or_else(|| Error::msg("forward: input_ids are required"))?;
        if ids.rank() != 2 {
            return Err(Error::shape(
                "forward",
                format!("input_ids must be [B, T], got {:?}", ids.shape()),
            ));
        }
        let (b, seq) = (ids.dim(0)?, ids.dim(1)?);
        let mask_vec = match &batch.attention_mask {
            Some(m) if m.shape() != ids.shape() => {
                return Err(Error::shape(
                    "forward",
                    format!(
                        "attention_mask {:?} != input_ids {:?}",
                        m.shape(),
                        ids.shape()
                    ),
                ))
            }
            Some(m) => Some(m.to_dtype(DType::I64)?.to_vec::<i64>()?),
            None => None,
        };
        let pos = rope_index(
            c,
            &ids.to_vec::<i64>()?,
            b,
            seq,
            mask_vec.as_deref(),
            &batch.image_grid_thw,
        )?;
        let mut h = self.embed(batch)?;
        let (cos, sin) = mrope_tables(t, &pos, h.dtype())?;
        let (cos, sin) = (cos.to_device(h.device())?, sin.to_device(h.device())?);
        let (hd, nh, nkv) = (t.head_dim(), t.num_attention_heads, t.num_key_value_heads);
        let opts = AttentionOptions {
            causal: true,
            key_padding: match &batch.attention_mask {
                Some(m) => Some(m.to_device(h.device())?),
                None => None,
            },
            ..Default::default()
        };
        for i in 0..t.num_hidden_layers {
            let w = |s: &str| self.p(&format!("model.layers.{i}.{s}"));
            let x = h.rms_norm(w("input_layernorm.weight")?, t.rms_norm_eps)?;
            let heads = |y: Tensor, n: usize| y.reshape(&[b, seq, n, hd])?.transpose(1, 2);
            let q = heads(
                x.linear(
                    w("self_attn.q_proj.weight")?,
                    Some(w("self_attn.q_proj.bias")?),
                )?,
                nh,
            )?
            .rope(&cos, &sin)?;
            let k = heads(
                x.linear(
                    w("self_attn.k_proj.weight")?,
                    Some(w("self_attn.k_proj.bias")?),
                )?,
                nkv,
            )?
            .rope(&cos, &sin)?;
            let v = heads(
                x.linear(
                    w("self_attn.v_proj.weight")?,
                    Some(w("self_attn.v_proj.bias")?),
                )?,
                nkv,
            )?;
            let a = Tensor::attention(&q, &k, &v, &opts)?
                .transpose(1, 2)?
                .reshape(&[b, seq, nh * hd])?;
            h = h.add(&a.linear(w("self_attn.o_proj.weight")?, None)?)?;
            let x = h.rms_norm(w("post_attention_layernorm.weight")?, t.rms_norm_eps)?;
            let m = x
                .linear(w("mlp.gate_proj.weight")?, None)?
                .swiglu(&x.linear(w("mlp.up_proj.weight")?, None)?)?;
            h = h.add(&m.linear(w("mlp.down_proj.weight")?, None)?)?;
        }
        let h = h.rms_norm(self.p("model.norm.weight")?, t.rms_norm_eps)?;
        let logits = h.linear(self.lm_head()?, None)?;
        let loss = match &batch.labels {
            None => None,
            Some(l) if l.shape() != ids.shape() => {
                return Err(Error::shape(
                    "forward",
                    format!("labels {:?} != input_ids {:?}", l.shape(), ids.shape()),
                ))
            }
            Some(l) => {
                // Position t predicts label t+1 (a sequence of one token has no target).
                let n = seq.saturating_sub(1);
                let shifted = l.to_dtype(DType::I64)?.narrow(1, 1.min(seq), n)?;
                Some(
                    logits
                        .narrow(1, 0, n)?
                        .to_dtype(DType::F32)?
                        .cross_entropy(&shifted, -100)?,
                )
            }
        };
        Ok(Output {
            logits,
            loss,
            rope_deltas: pos.rope_deltas,
        })
    }
}
