//! One SGD step written into the model's own parameters, and its exact undo.
//!
//! The measured change Δ log π(x_v) | x_u needs the model after one step on x_u. Copying a
//! whole model per training sample would double its memory, so the step is written in place
//! and undone afterwards from saved copies of the touched (selected) parameters: the restored
//! values are the saved bits, not θ + ηd − ηd.

use super::select::SelectedParams;
use crate::{Error, Result, Tensor};

/// A step taken in place; `restore` writes the saved values back.
#[must_use = "an applied step changes the model until it is restored"]
pub struct AppliedStep {
    /// (the model's leaf, a copy of its values before the step)
    saved: Vec<(Tensor, Tensor)>,
}

/// θ ← θ + lr · direction on the selected parameters (`direction` flattened in their order,
/// as `sample_gradient` gives it). Computed in f64 and rounded once to each parameter's dtype.
pub fn apply_step(selected: &SelectedParams, direction: &[f64], lr: f64) -> Result<AppliedStep> {
    if direction.len() != selected.numel {
        return Err(Error::msg(format!(
            "step direction has {} values for {} selected parameters' {} elements",
            direction.len(),
            selected.tensors.len(),
            selected.numel
        )));
    }
    let mut step = AppliedStep { saved: Vec::new() };
    let mut offset = 0;
    for (name, leaf) in selected.names.iter().zip(&selected.tensors) {
        let n = leaf.numel();
        let result = (|| {
            let before = leaf.to_f64s()?;
            let copy = Tensor::from_f64s(&before, leaf.shape(), leaf.dtype())?;
            let after: Vec<f64> = before
                .iter()
                .zip(&direction[offset..offset + n])
                .map(|(w, d)| w + lr * d)
                .collect();
            leaf.assign(&Tensor::from_f64s(&after, leaf.shape(), leaf.dtype())?)?;
            Ok::<_, Error>(copy)
        })();
        match result {
            Ok(copy) => step.saved.push((leaf.clone(), copy)),
            Err(e) => {
                // Leave the model as it was before the failed step.
                step.restore()?;
                return Err(Error::msg(format!("step on parameter '{name}': {e}")));
            }
        }
        offset += n;
    }
    Ok(step)
}

impl AppliedStep {
    /// Writes the saved values back (bit-exact).
    pub fn restore(self) -> Result<()> {
        for (leaf, copy) in &self.saved {
            leaf.assign(copy)?;
        }
        Ok(())
    }
}

/// Runs `f` on the model after θ ← θ + lr · direction, then restores θ, whether `f`
/// succeeded or not.
pub fn with_step<R>(
    selected: &SelectedParams,
    direction: &[f64],
    lr: f64,
    f: impl FnOnce() -> Result<R>,
) -> Result<R> {
    let step = apply_step(selected, direction, lr)?;
    let result = f();
    step.restore()?;
    result
}
