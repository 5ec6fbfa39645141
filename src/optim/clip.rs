//! Gradient clipping by global norm, as `torch.nn.utils.clip_grad_norm_`.

use crate::{float_dispatch, Float, Result, Tensor, WithDType};

/// Clips the gradients of `params` by their global L2 norm and returns that norm (before
/// clipping).
///
/// ```text
/// norm = sqrt(sum over params, elements of g^2)        accumulated in f64
/// coef = max_norm / (norm + 1e-6)
/// if coef < 1:  g <- g * coef                          for every gradient
/// ```
///
/// As in torch the 1e-6 keeps the division finite, so a clipped global norm ends slightly
/// below `max_norm`. Parameters without a gradient are ignored. A non-finite norm (an
/// overflow or a NaN in some gradient) is returned without touching any gradient: the
/// caller decides (typically: skip the step or fail).
///
/// CUDA gradients (f32 or bf16) are reduced on the device (a deterministic two-pass f64 sum
/// of squares) and scaled there; CPU and CUDA gradients may be mixed.
///
/// Each clipped gradient is replaced by a new contiguous tensor holding the scaled values
/// (`p.grad()` afterwards returns it), so a gradient tensor obtained before the call keeps
/// its old values and the buffer of a broadcast gradient is never written through.
pub fn clip_grad_norm<'a>(
    params: impl IntoIterator<Item = &'a Tensor>,
    max_norm: f64,
) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm >= 0.0) {
        return Err(crate::Error::msg(format!(
            "clip_grad_norm: invalid max_norm {max_norm}"
        )));
    }
    let with_grad: Vec<(&Tensor, Tensor)> = params
        .into_iter()
        .filter_map(|p| p.grad().map(|g| (p, g)))
        .collect();
    let mut sum_sq = 0.0f64;
    let mut cuda_grads = Vec::new();
    for (_, g) in &with_grad {
        if g.is_cuda() {
            cuda_grads.push(g.clone());
        } else {
            sum_sq += float_dispatch!(g.dtype(), "clip_grad_norm", T => sum_squares::<T>(g)?);
        }
    }
    if !cuda_grads.is_empty() {
        // One two-pass f64 reduction over all device gradients, one copy to the host.
        sum_sq += crate::no_grad(|| crate::backend::cuda::ops::optim::sum_squares(&cuda_grads))?;
    }
    let norm = sum_sq.sqrt();
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (p, g) in &with_grad {
            if g.is_cuda() {
                // The factor rounded to the gradient's dtype, as the CPU path multiplies in T.
                let c = match g.dtype() {
                    crate::DType::BF16 => half::bf16::from_f64(coef).to_f32(),
                    _ => coef as f32,
                };
                let scaled = crate::no_grad(|| crate::backend::cuda::ops::optim::scale(g, c))?;
                p.set_grad(Some(scaled));
                continue;
            }
            let scaled = float_dispatch!(g.dtype(), "clip_grad_norm", T => {
                let c = T::c(coef);
                let v: Vec<T> = g.to_vec::<T>()?.into_iter().map(|x| x * c).collect();
                Tensor::from_vec(v, g.shape())?
            });
            p.set_grad(Some(scaled));
        }
    }
    Ok(norm)
}

fn sum_squares<T: Float>(g: &Tensor) -> Result<f64> {
    let g = g.contiguous()?;
    g.read::<T, _>(|xs| {
        xs.iter()
            .map(|&x| {
                let x = WithDType::to_f64(x);
                x * x
            })
            .sum::<f64>()
    })
}
