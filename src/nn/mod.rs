//! Layers as small structs of named parameters: Linear, RmsNorm, Embedding, and a parameter
//! list that optimisers and checkpoints walk by name.

pub mod tiny_lm;

use crate::{DType, Result, Rng, Tensor};

/// Named parameters in a fixed order (the order optimiser state and checkpoints use).
#[derive(Default, Clone)]
pub struct Params {
    entries: Vec<(String, Tensor)>,
    index: std::collections::HashMap<String, usize>,
}

impl Params {
    /// `autograd::checkpoint` of a block whose weights are the parameters named `prefix*`
    /// (a decoder layer's `model.layers.{i}.`): `f` gets the block's inputs and those
    /// parameters by their names (detached copies in the backward's recomputation), and the
    /// parameters get their gradients through the checkpoint.
    pub fn checkpoint_block(
        &self,
        prefix: &str,
        inputs: &[&Tensor],
        f: impl Fn(&[Tensor], &Params) -> Result<Vec<Tensor>> + Send + Sync + 'static,
    ) -> Result<Vec<Tensor>> {
        let (names, weights): (Vec<String>, Vec<Tensor>) = self
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, t)| (n.to_string(), t.clone()))
            .unzip();
        crate::autograd::checkpoint(
            inputs,
            &weights.iter().collect::<Vec<_>>(),
            move |xs, ws| {
                let mut p = Params::default();
                for (n, w) in names.iter().zip(ws) {
                    p.push(n.as_str(), w);
                }
                f(xs, &p)
            },
        )
    }

    /// Adds (or replaces) a parameter.
    pub fn push(&mut self, name: impl Into<String>, t: &Tensor) {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => self.entries[i].1 = t.clone(),
            None => {
                self.index.insert(name.clone(), self.entries.len());
                self.entries.push((name, t.clone()));
            }
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }
    pub fn tensors(&self) -> Vec<Tensor> {
        self.entries.iter().map(|(_, t)| t.clone()).collect()
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }
    /// The parameter `name`, or an error naming it.
    pub fn require(&self, name: &str) -> crate::Result<&Tensor> {
        self.get(name)
            .ok_or_else(|| crate::Error::msg(format!("missing parameter '{name}'")))
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.numel()).sum()
    }
    /// `f` applied to every parameter, names and order kept.
    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Params> {
        let mut out = Params::default();
        for (name, t) in self.iter() {
            out.push(name, &f(t)?);
        }
        Ok(out)
    }
    /// New leaves made by `f` from detached parameters, wanting gradients where the source did.
    fn new_leaves(&self, f: impl Fn(Tensor) -> Result<Tensor>) -> Result<Params> {
        self.map(|t| {
            let leaf = crate::no_grad(|| f(t.detach()))?;
            Ok(if t.requires_grad() {
                leaf.requires_grad_()
            } else {
                leaf
            })
        })
    }
    /// The same parameters as new leaves on `device` (gradients wanted where the source
    /// wanted them).
    pub fn to_device(&self, device: crate::Device) -> Result<Params> {
        self.new_leaves(|t| t.to_device(device))
    }
    /// The same parameters cast to `dtype`, as new leaves.
    pub fn to_dtype(&self, dtype: DType) -> Result<Params> {
        self.new_leaves(|t| t.to_dtype(dtype))
    }
    /// Differentiable casts of every float parameter to `dtype` (mixed precision: compute with
    /// the casts, gradients flow back to these f32 masters).
    pub fn cast(&self, dtype: DType) -> Result<Params> {
        self.map(|t| {
            if t.dtype().is_float() {
                t.to_dtype(dtype)
            } else {
                Ok(t.clone())
            }
        })
    }
    /// The same names in the same order with `tensors` in their place (one per parameter, in
    /// order: `AdamW::compute_params` of an optimiser built from `tensors()`, say).
    pub fn with_tensors(&self, tensors: Vec<Tensor>) -> Result<Params> {
        if tensors.len() != self.len() {
            return Err(crate::Error::msg(format!(
                "Params::with_tensors: {} tensors for {} parameters",
                tensors.len(),
                self.len()
            )));
        }
        let mut out = Params::default();
        for ((name, _), t) in self.iter().zip(&tensors) {
            out.push(name, t);
        }
        Ok(out)
    }
    /// Writes every parameter to a safetensors file (atomically).
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let refs: Vec<(&str, &Tensor)> = self.iter().collect();
        crate::io::save(path, &refs, None)
    }
}

/// y = x Wᵀ + b with W [out, in].
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Weights ~ N(0, std²) (GPT-2 / Qwen use std 0.02), zero bias.
    pub fn new(
        din: usize,
        dout: usize,
        bias: bool,
        std: f64,
        dtype: DType,
        rng: &mut Rng,
    ) -> Result<Linear> {
        Ok(Linear {
            weight: Tensor::randn(&[dout, din], std, dtype, rng)?.requires_grad_(),
            bias: if bias {
                Some(Tensor::zeros(&[dout], dtype)?.requires_grad_())
            } else {
                None
            },
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.linear(&self.weight, self.bias.as_ref())
    }
    pub fn collect(&self, prefix: &str, p: &mut Params) {
        p.push(format!("{prefix}.weight"), &self.weight);
        if let Some(b) = &self.bias {
            p.push(format!("{prefix}.bias"), b);
        }
    }
}

pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(d: usize, eps: f64, dtype: DType) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: Tensor::ones(&[d], dtype)?.requires_grad_(),
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.rms_norm(&self.weight, self.eps)
    }
}

pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(vocab: usize, d: usize, std: f64, dtype: DType, rng: &mut Rng) -> Result<Embedding> {
        Ok(Embedding {
            weight: Tensor::randn(&[vocab, d], std, dtype, rng)?.requires_grad_(),
        })
    }
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Tensor::embedding(ids, &self.weight)
    }
}

/// cos and sin tables [T, D] of rotate-half RoPE for positions 0..T.
pub fn rope_tables(
    t: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut c = Vec::with_capacity(t * head_dim);
    let mut s = Vec::with_capacity(t * head_dim);
    for pos in 0..t {
        for j in 0..head_dim {
            let inv = theta.powf(-((2 * (j % half)) as f64) / head_dim as f64);
            let a = pos as f64 * inv;
            c.push(a.cos());
            s.push(a.sin());
        }
    }
    Ok((
        Tensor::from_f64s(&c, &[t, head_dim], dtype)?,
        Tensor::from_f64s(&s, &[t, head_dim], dtype)?,
    ))
}
