//! `tessera policy-loss`: the GRPO loss family and its gradient with respect to the policy
//! log-probs, on tensors from a safetensors file; the contract is in DESIGN.md ("CLI
//! contracts"), the formulas in `crate::rl::policy_loss`.

use crate::io::TensorFile;
use crate::rl::{policy_loss_and_grad, LossType, PolicyLossConfig, PolicyLossInputs};
use crate::{DType, Error, Result, Tensor};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct PolicyLossArgs {
    /// logps, old_logps, ref_logps F32 [B,T]; advantages F32 [B]; mask F32 [B,T]
    /// (ref_logps may be absent when --beta is 0).
    #[arg(long)]
    inputs: PathBuf,
    /// Writes loss F32 scalar and grad_logps F32 [B,T] (d loss / d logps).
    #[arg(long)]
    out: PathBuf,
    /// grpo | bnpo | dr_grpo | dapo.
    #[arg(long)]
    loss_type: String,
    /// KL coefficient (k3 estimator against ref_logps); 0 = no KL term.
    #[arg(long, default_value_t = 0.0)]
    beta: f64,
    /// Lower clip range: the ratio is clipped below at 1 - epsilon.
    #[arg(long, default_value_t = 0.2)]
    epsilon: f64,
    /// Upper clip range (DAPO clip-higher); default = --epsilon.
    #[arg(long)]
    epsilon_high: Option<f64>,
    /// Dr. GRPO normaliser; default = T.
    #[arg(long)]
    max_completion_len: Option<usize>,
}

/// Reads `name` as F32 of shape `shape` (None = absent), converted to f64 for the computation.
fn read(f: &TensorFile, path: &Path, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
    if !f.contains(name) {
        return Ok(None);
    }
    let t = f.get(name)?;
    if t.dtype() != DType::F32 {
        return Err(Error::file(
            path,
            format!("tensor '{name}' must be F32, found {}", t.dtype()),
        ));
    }
    if t.shape() != shape {
        return Err(Error::file(
            path,
            format!(
                "tensor '{name}' must have shape {shape:?}, found {:?}",
                t.shape()
            ),
        ));
    }
    Ok(Some(t.to_dtype(DType::F64)?))
}

pub fn run(a: PolicyLossArgs) -> Result<()> {
    let cfg = PolicyLossConfig {
        loss_type: a.loss_type.parse::<LossType>()?,
        beta: a.beta,
        epsilon: a.epsilon,
        epsilon_high: a.epsilon_high,
        max_completion_len: a.max_completion_len,
    };
    let path = a.inputs.as_path();
    let f = TensorFile::open(path)?;
    let missing = |n: &str| Error::file(path, format!("no tensor '{n}'"));
    if !f.contains("logps") {
        return Err(missing("logps"));
    }
    let shape = f.shape("logps")?.to_vec();
    if shape.len() != 2 {
        return Err(Error::file(
            path,
            format!("tensor 'logps' must be [B, T], found {shape:?}"),
        ));
    }
    let logps = read(&f, path, "logps", &shape)?.ok_or_else(|| missing("logps"))?;
    let old_logps = read(&f, path, "old_logps", &shape)?.ok_or_else(|| missing("old_logps"))?;
    let advantages =
        read(&f, path, "advantages", &shape[..1])?.ok_or_else(|| missing("advantages"))?;
    let mask = read(&f, path, "mask", &shape)?.ok_or_else(|| missing("mask"))?;
    let ref_logps = read(&f, path, "ref_logps", &shape)?;
    if cfg.beta > 0.0 && ref_logps.is_none() {
        return Err(Error::file(
            path,
            format!(
                "no tensor 'ref_logps' (needed for the KL term, --beta {})",
                cfg.beta
            ),
        ));
    }
    let inputs = PolicyLossInputs {
        logps: &logps,
        old_logps: &old_logps,
        ref_logps: ref_logps.as_ref(),
        advantages: &advantages,
        mask: &mask,
    };
    let (loss, grad) = policy_loss_and_grad(&inputs, &cfg)?;
    let loss = loss.reshape(&[])?.to_dtype(DType::F32)?;
    let grad = grad.to_dtype(DType::F32)?;
    crate::io::save(&a.out, &[("loss", &loss), ("grad_logps", &grad)], None)
}
