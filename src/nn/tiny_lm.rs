//! A small decoder-only transformer with Qwen2's block (RMSNorm, GQA attention with RoPE,
//! SwiGLU MLP, tied embeddings): the model of the `demo` job and of the CPU benchmarks.

use super::{rope_tables, Embedding, Linear, Params, RmsNorm};
use crate::ops::attention::AttentionOptions;
use crate::{DType, Result, Rng, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct TinyLmConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub rope_theta: f64,
    pub eps: f64,
}

struct Block {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct TinyLm {
    pub config: TinyLmConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
}

impl TinyLm {
    pub fn new(config: TinyLmConfig, dtype: DType, rng: &mut Rng) -> Result<TinyLm> {
        let c = config;
        let hd = c.hidden / c.heads;
        let std = 0.02;
        let blocks = (0..c.layers)
            .map(|_| {
                Ok(Block {
                    input_norm: RmsNorm::new(c.hidden, c.eps, dtype)?,
                    q: Linear::new(c.hidden, c.heads * hd, true, std, dtype, rng)?,
                    k: Linear::new(c.hidden, c.kv_heads * hd, true, std, dtype, rng)?,
                    v: Linear::new(c.hidden, c.kv_heads * hd, true, std, dtype, rng)?,
                    o: Linear::new(c.heads * hd, c.hidden, false, std, dtype, rng)?,
                    post_norm: RmsNorm::new(c.hidden, c.eps, dtype)?,
                    gate: Linear::new(c.hidden, c.intermediate, false, std, dtype, rng)?,
                    up: Linear::new(c.hidden, c.intermediate, false, std, dtype, rng)?,
                    down: Linear::new(c.intermediate, c.hidden, false, std, dtype, rng)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TinyLm {
            config,
            embed: Embedding::new(c.vocab, c.hidden, std, dtype, rng)?,
            blocks,
            norm: RmsNorm::new(c.hidden, c.eps, dtype)?,
        })
    }

    /// Parameters under Qwen2-style names.
    pub fn params(&self) -> Params {
        let mut p = Params::default();
        p.push("model.embed_tokens.weight", &self.embed.weight);
        for (i, b) in self.blocks.iter().enumerate() {
            let pre = format!("model.layers.{i}");
            p.push(
                format!("{pre}.input_layernorm.weight"),
                &b.input_norm.weight,
            );
            b.q.collect(&format!("{pre}.self_attn.q_proj"), &mut p);
            b.k.collect(&format!("{pre}.self_attn.k_proj"), &mut p);
            b.v.collect(&format!("{pre}.self_attn.v_proj"), &mut p);
            b.o.collect(&format!("{pre}.self_attn.o_proj"), &mut p);
            p.push(
                format!("{pre}.post_attention_layernorm.weight"),
                &b.post_norm.weight,
            );
            b.gate.collect(&format!("{pre}.mlp.gate_proj"), &mut p);
            b.up.collect(&format!("{pre}.mlp.up_proj"), &mut p);
            b.down.collect(&format!("{pre}.mlp.down_proj"), &mut p);
        }
        p.push("model.norm.weight", &self.norm.weight);
        p
    }

    /// ids [B, T] -> logits [B, T, V] (causal).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = (ids.dim(0)?, ids.dim(1)?);
        let hd = c.hidden / c.heads;
        let dtype = self.embed.weight.dtype();
        let (cos, sin) = rope_tables(t, hd, c.rope_theta, dtype)?;
        let mut h = self.embed.forward(ids)?;
        let opts = AttentionOptions {
            causal: true,
            ..Default::default()
        };
        for blk in &self.blocks {
            let x = blk.input_norm.forward(&h)?;
            // [B, T, H*hd] -> [B, H, T, hd]
            let heads = |y: Tensor, n: usize| y.reshape(&[b, t, n, hd])?.transpose(1, 2);
            let q = heads(blk.q.forward(&x)?, c.heads)?.rope(&cos, &sin)?;
            let k = heads(blk.k.forward(&x)?, c.kv_heads)?.rope(&cos, &sin)?;
            let v = heads(blk.v.forward(&x)?, c.kv_heads)?;
            let a = Tensor::attention(&q, &k, &v, &opts)?
                .transpose(1, 2)?
                .reshape(&[b, t, c.hidden])?;
            h = h.add(&blk.o.forward(&a)?)?;
            let x = blk.post_norm.forward(&h)?;
            let m = blk.gate.forward(&x)?.swiglu(&blk.up.forward(&x)?)?;
            h = h.add(&blk.down.forward(&m)?)?;
        }
        // Tied lm_head: logits = h Eᵀ.
        self.norm.forward(&h)?.linear(&self.embed.weight, None)
    }
}
