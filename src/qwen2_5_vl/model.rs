//! `QwenVl` = transformers' Qwen2_5_VLForConditionalGeneration: embeddings (+ image features scattered into the image
//! tokens), M-RoPE decoder with GQA, final norm, lm_head, HF loss.

use super::config::Config;
use super::rope::{mrope_tables, rope_index, Positions};
use super::vision::vision_forward_with;
use super::weights;
use crate::nn::Params;
use crate::ops::attention::AttentionOptions;
use crate::{DType, Error, Result, Rng, Tensor};
use std::path::Path;

/// The model: its config and its named parameters (cloning shares the tensors).
#[derive(Clone)]
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

/// `TESSERA_QKV_FUSED=0`: three q/k/v products on CUDA too (see `QwenVl::layer`), for
/// measuring what the one product saves.
static QKV_FUSED: crate::backend::cuda::Switch =
    crate::backend::cuda::Switch::new("TESSERA_QKV_FUSED");

/// The decoder stack's inputs for a batch (see [`QwenVl::decoder_inputs`]).
pub struct DecoderInputs {
    /// Token embeddings with image features merged: [B, T, C].
    pub hidden: Tensor,
    /// M-RoPE tables [B, 1, T, head_dim], on the hidden state's device and dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// attention_mask [B, T] (nonzero = token) when given, on the host: attention reads it
    /// there (which keys each query sees), so a device copy would be read back in every layer.
    pub key_padding: Option<Tensor>,
    /// The (T, H, W) position ids and per-row rope deltas they came from.
    pub positions: Positions,
}

/// Keys (after rope) and values of one decoder layer: [B, KV, T, head_dim] each.
#[derive(Clone)]
pub struct LayerKv {
    pub keys: Tensor,
    pub values: Tensor,
}

/// What every decoder layer of one pass reads besides its own weights: the rotary tables
/// cos/sin [B, 1, T, head_dim] and the attention options (causal, key padding).
#[derive(Clone)]
struct LayerShared {
    cos: Tensor,
    sin: Tensor,
    opts: AttentionOptions,
}

impl LayerShared {
    fn new(cos: &Tensor, sin: &Tensor, opts: &AttentionOptions) -> LayerShared {
        LayerShared {
            cos: cos.clone(),
            sin: sin.clone(),
            opts: opts.clone(),
        }
    }
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

    /// The same model computing in `dtype`: its float parameters cast (`Params::cast`; with
    /// gradients on, the casts' backward sends f32 gradients to these parameters), or shared
    /// as they are where they already have the dtype.
    pub fn cast(&self, dtype: DType) -> Result<QwenVl> {
        Ok(QwenVl {
            config: self.config.clone(),
            params: self.params.cast(dtype)?,
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
        let e = {
            let _part = crate::autograd::part("token embedding");
            Tensor::embedding(ids, self.p("model.embed_tokens.weight")?)?
        };
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
        let feats = vision_forward_with(
            &self.params,
            &self.config.vision,
            pixels,
            &batch.image_grid_thw,
            self.config.gradient_checkpointing,
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
        let _part = crate::autograd::part("token embedding");
        e.masked_scatter(&mask, &feats.to_dtype(e.dtype())?)
    }

    /// What the decoder stack consumes for a batch: embeddings (image features merged), the
    /// M-RoPE positions of `get_rope_index` and their cos/sin tables, and the key mask.
    pub fn decoder_inputs(&self, batch: &Batch) -> Result<DecoderInputs> {
        let c = &self.config;
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
        let positions = rope_index(
            c,
            &ids.to_vec::<i64>()?,
            b,
            seq,
            mask_vec.as_deref(),
            &batch.image_grid_thw,
        )?;
        let hidden = self.embed(batch)?;
        let (cos, sin) = mrope_tables(&c.text, &positions, hidden.dtype())?;
        let key_padding = match &batch.attention_mask {
            Some(m) => Some(m.to_cpu()?),
            None => None,
        };
        Ok(DecoderInputs {
            cos: cos.to_device(hidden.device())?,
            sin: sin.to_device(hidden.device())?,
            hidden,
            key_padding,
            positions,
        })
    }

    /// Decoder layer `i` over h [B, T, C] with rope tables cos/sin [B, 1, T, head_dim]:
    ///   x = RMSNorm(h); q, k, v = proj(x); q, k = mrope(q, k)
    ///   h = h + o_proj(attn(q, [past.keys; k], [past.values; v]))
    ///   h = h + down(SiLU(gate(RMSNorm(h))) · up(RMSNorm(h)))
    /// `past` holds the keys/values of earlier tokens (decoding with a cache): the T queries
    /// come after them, which the bottom-right aligned causal mask accounts for, and
    /// `opts.key_padding` then covers all past + T keys. Returns the new h and this layer's
    /// keys/values over past + T tokens.
    pub fn decoder_layer(
        &self,
        i: usize,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        opts: &AttentionOptions,
        past: Option<&LayerKv>,
    ) -> Result<(Tensor, LayerKv)> {
        let shared = LayerShared::new(cos, sin, opts);
        let (h, mlp, kv) = self.layer(i, h, None, &shared, past)?;
        Ok((h.add(&mlp)?, kv))
    }

    /// `decoder_layer` with its last residual add left to the caller: given h and the previous
    /// layer's MLP output still to be added (`pending`), returns (h after attention, this
    /// layer's MLP output, keys/values). Each residual add is then fused with the norm that
    /// follows it (`add_rms_norm`).
    fn layer(
        &self,
        i: usize,
        h: &Tensor,
        pending: Option<&Tensor>,
        shared: &LayerShared,
        past: Option<&LayerKv>,
    ) -> Result<(Tensor, Tensor, LayerKv)> {
        let LayerShared { cos, sin, opts } = shared;
        let t = &self.config.text;
        let (b, seq) = (h.dim(0)?, h.dim(1)?);
        let (hd, nh, nkv) = (t.head_dim(), t.num_attention_heads, t.num_key_value_heads);
        let w = |s: &str| self.p(&format!("model.layers.{i}.{s}"));
        let part = crate::autograd::part("text attention");
        let (h, x) = h.add_opt_rms_norm(pending, w("input_layernorm.weight")?, t.rms_norm_eps)?;
        let [q, k, v] = if seq > 1 && x.is_cuda() && QKV_FUSED.get() != Some(0) {
            // On CUDA, one product for q, k and v (their weights and biases concatenated: 10 MB
            // a layer in the 3B model) instead of three: k and v alone are 256 columns wide,
            // too few to fill the GPU, and x's gradient is then one product with no adds.
            // Decoding (one token a row) keeps three, where the concatenation would cost more
            // than it saves, and so does the CPU, whose GEMM gains nothing from it: there the
            // one product would only round x's gradient differently (the tiny study's GRPO arm
            // is sensitive enough to that to find no correct jigsaw in 300 steps).
            let cat = |what: &str| -> Result<Tensor> {
                let [q, k, v] = ["q_proj", "k_proj", "v_proj"]
                    .map(|name| w(&format!("self_attn.{name}.{what}")));
                Tensor::cat(&[q?, k?, v?], 0)
            };
            let parts = x
                .linear(&cat("weight")?, Some(&cat("bias")?))?
                .reshape(&[b, seq, nh + 2 * nkv, hd])?
                .split(&[nh, nkv, nkv], 2)?;
            let mut heads = parts.iter().map(|t| t.transpose(1, 2));
            [(); 3].map(|_| heads.next().expect("three parts"))
        } else {
            let proj = |name: &str, n: usize| -> Result<Tensor> {
                x.linear(
                    w(&format!("self_attn.{name}.weight"))?,
                    Some(w(&format!("self_attn.{name}.bias"))?),
                )?
                .reshape(&[b, seq, n, hd])?
                .transpose(1, 2)
            };
            [proj("q_proj", nh), proj("k_proj", nkv), proj("v_proj", nkv)]
        };
        let q = q?.rope(cos, sin)?;
        let mut k = k?.rope(cos, sin)?;
        // Contiguous once: attention reads it so (it copied v in its forward and again in its
        // backward), and the saved v no longer holds the whole q/k/v product alive.
        let mut v = v?.contiguous()?;
        if let Some(past) = past {
            k = Tensor::cat(&[&past.keys, &k], 2)?;
            v = Tensor::cat(&[&past.values, &v], 2)?;
        }
        let a = Tensor::attention(&q, &k, &v, opts)?
            .transpose(1, 2)?
            .reshape(&[b, seq, nh * hd])?;
        let o = a.linear(w("self_attn.o_proj.weight")?, None)?;
        drop(part);
        let _part = crate::autograd::part("text mlp");
        let (h, x) = h.add_rms_norm(&o, w("post_attention_layernorm.weight")?, t.rms_norm_eps)?;
        let m = x
            .linear(w("mlp.gate_proj.weight")?, None)?
            .swiglu(&x.linear(w("mlp.up_proj.weight")?, None)?)?;
        let m = m.linear(w("mlp.down_proj.weight")?, None)?;
        Ok((h, m, LayerKv { keys: k, values: v }))
    }

    /// `layer` (no cache) under `autograd::checkpoint`: its inputs kept, its forward computed
    /// again in the backward with the layer's weights (`model.layers.{i}.*`) passed as params.
    fn layer_checkpointed(
        &self,
        i: usize,
        h: &Tensor,
        pending: Option<&Tensor>,
        shared: &LayerShared,
    ) -> Result<(Tensor, Tensor)> {
        let (config, shared) = (self.config.clone(), shared.clone());
        let mut inputs = vec![h];
        inputs.extend(pending);
        let prefix = format!("model.layers.{i}.");
        let outs = self
            .params
            .checkpoint_block(&prefix, &inputs, move |xs, params| {
                let layer = QwenVl {
                    config: config.clone(),
                    params: params.clone(),
                };
                let (h, mlp, _) = layer.layer(i, &xs[0], xs.get(1), &shared, None)?;
                Ok(vec![h, mlp])
            })?;
        let mut it = outs.into_iter();
        Ok((it.next().expect("h"), it.next().expect("mlp")))
    }

    /// All decoder layers over `hidden` [B, T, C] (causal, `key_padding` [B, Tk] masks
    /// padding keys). Without a cache Tk = T. With one, `cache` holds one `LayerKv` per layer
    /// for the earlier tokens (Tk = earlier + T) and is replaced by the extended keys/values;
    /// an empty cache is filled (prefill).
    pub fn decoder(
        &self,
        hidden: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        key_padding: Option<&Tensor>,
        mut cache: Option<&mut Vec<LayerKv>>,
    ) -> Result<Tensor> {
        let layers = self.config.text.num_hidden_layers;
        let opts = AttentionOptions {
            causal: true,
            key_padding: key_padding.cloned(),
            ..Default::default()
        };
        let shared = LayerShared::new(cos, sin, &opts);
        if let Some(c) = cache.as_deref() {
            if !c.is_empty() && c.len() != layers {
                return Err(Error::msg(format!(
                    "decoder: the cache holds {} layers, the model has {layers}",
                    c.len()
                )));
            }
        }
        let (mut h, mut pending) = (hidden, None);
        let checkpoint = self.config.gradient_checkpointing
            && cache.is_none()
            && crate::autograd::is_grad_enabled();
        for i in 0..layers {
            if checkpoint {
                let (next, mlp) = self.layer_checkpointed(i, &h, pending.as_ref(), &shared)?;
                (h, pending) = (next, Some(mlp));
                continue;
            }
            let past = cache.as_deref().and_then(|c| c.get(i));
            let (next, mlp, kv) = self.layer(i, &h, pending.as_ref(), &shared, past)?;
            (h, pending) = (next, Some(mlp));
            if let Some(c) = cache.as_deref_mut() {
                if c.len() == layers {
                    c[i] = kv;
                } else {
                    c.push(kv);
                }
            }
        }
        match pending {
            Some(m) => h.add(&m),
            None => Ok(h),
        }
    }

    /// Final RMSNorm and lm_head: h [B, T, C] -> logits [B, T, V].
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let _part = crate::autograd::part("lm head and loss");
        h.rms_norm(self.p("model.norm.weight")?, self.config.text.rms_norm_eps)?
            .linear(self.lm_head()?, None)
    }

    /// The logits of positions `start .. start + len` only, [B, len, V]: the forward's values
    /// there. On CUDA the final norm and the lm head run over those positions alone (what a
    /// policy's log-probabilities of its completion need: with image prompts most positions
    /// are the prompt's, and [B, T, V] logits of a real vocabulary take gigabytes). The CPU
    /// runs them over every position, as `forward`, and narrows after: the head's weight
    /// gradient summed over fewer rows rounds differently, and the tiny study's GRPO arm is
    /// sensitive to rounding (docs/study.md), while its 192-token vocabulary gains nothing.
    pub fn logits_at(&self, batch: &Batch, start: usize, len: usize) -> Result<Tensor> {
        let x = self.decoder_inputs(batch)?;
        let seq = x.positions.seq;
        if start + len > seq {
            return Err(Error::shape(
                "logits_at",
                format!(
                    "positions {start}..{} of a {seq}-token sequence",
                    start + len
                ),
            ));
        }
        let h = self.decoder(x.hidden, &x.cos, &x.sin, x.key_padding.as_ref(), None)?;
        if h.is_cuda() {
            self.head(&h.narrow(1, start, len)?)
        } else {
            self.head(&h)?.narrow(1, start, len)
        }
    }

    pub fn forward(&self, batch: &Batch) -> Result<Output> {
        let x = self.decoder_inputs(batch)?;
        let h = self.decoder(x.hidden, &x.cos, &x.sin, x.key_padding.as_ref(), None)?;
        let logits = self.head(&h)?;
        let ids = batch
            .input_ids
            .as_ref()
            .ok_or_else(|| Error::msg("forward: input_ids are required"))?;
        let seq = ids.dim(1)?;
        let loss = match &batch.labels {
            None => None,
            Some(l) if l.shape() != ids.shape() => {
                return Err(Error::shape(
                    "forward",
                    format!("labels {:?} != input_ids {:?}", l.shape(), ids.shape()),
                ))
            }
            Some(l) => {
                let _part = crate::autograd::part("lm head and loss");
                // Position t predicts label t+1; the last position has none (-100, ignored), so
                // the loss reads the logits whole: no narrowed copy of [B, T-1, V] and no
                // zero-padded gradient for it. The same mean as over the first T-1 positions,
                // in f32 (from bf16 logits without an f32 copy of them).
                let n = seq.saturating_sub(1);
                let ids = l.to_dtype(DType::I64)?;
                // Made on the host (B values): the device fill kernels are float-only.
                let last = Tensor::full(&[ids.dim(0)?, seq - n], -100.0, DType::I64)?
                    .to_device(l.device())?;
                let targets = Tensor::cat(&[&ids.narrow(1, 1.min(seq), n)?, &last], 1)?;
                Some(logits.cross_entropy_f32(&targets, -100)?)
            }
        };
        Ok(Output {
            logits,
            loss,
            rope_deltas: x.positions.rope_deltas,
        })
    }
}
