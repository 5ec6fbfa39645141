//! CUDA elementwise ops (kernels/elementwise.cu): one generic family.
//!
//! - `unary_<T>(x, y, n, op, a, b)`: every unary op (op codes `U_*`), contiguous.
//! - `unary_backward_<T>(g, s, dx, n, op, a, b)`: the backward maps (`G_*`) whose CPU
//!   version is a dedicated `map2!`; `s` is the saved input (the output for sqrt).
//! - `binary_<T>(a, b, out, n, op)`: add/sub/mul/div (`B_*`) of same-shape contiguous inputs.
//! - `binary_strided_<T>(a, b, out, Bcast, n, op)`: the same for any strides and numpy
//!   broadcasting (stride 0), indexed against the contiguous output.
//!
//! Backward rules mirror src/ops/elementwise.rs. Sigmoid, tanh and rsqrt differentiate
//! through the saved input (σ(x), tanh(x), x^-1/2 recomputed in f32) instead of the saved
//! output: the same gradient, without the bf16 rounding of y (in `1 - y`, `y^3`).

use super::{grid_for, THREADS};
use crate::autograd::record;
use crate::backend::cuda::{arg, device, kernels::suffix};
use crate::{Error, Result, Tensor};

const U_AFFINE: i64 = 0;
const U_EXP: i64 = 1;
const U_LOG: i64 = 2;
const U_SQRT: i64 = 3;
const U_RSQRT: i64 = 4;
const U_POW: i64 = 5;
const U_ABS: i64 = 6;
const U_CLAMP: i64 = 7;
const U_SIGMOID: i64 = 8;
const U_TANH: i64 = 9;
const U_SILU: i64 = 10;
const U_GELU: i64 = 11;

const G_SQRT: i64 = 0;
const G_RSQRT: i64 = 1;
const G_POW: i64 = 2;
const G_ABS: i64 = 3;
const G_CLAMP: i64 = 4;
const G_SIGMOID: i64 = 5;
const G_TANH: i64 = 6;
const G_SILU: i64 = 7;
const G_GELU: i64 = 8;

/// Binary op codes of kernels/elementwise.cu (`B_*`).
pub const B_ADD: i64 = 0;
pub const B_SUB: i64 = 1;
pub const B_MUL: i64 = 2;
pub const B_DIV: i64 = 3;

/// `struct Bcast` of kernels/elementwise.cu: output shape and both inputs' element strides
/// against it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Bcast {
    pub rank: i64,
    pub shape: [i64; 8],
    pub sa: [i64; 8],
    pub sb: [i64; 8],
}

impl Bcast {
    /// Output `shape` with input strides `sa`, `sb` (same rank as `shape`; 0 = broadcast).
    /// Size-1 dims are dropped and a dim is merged into the previous one when both inputs
    /// allow it. Errors when more than 8 dims remain.
    pub fn new(shape: &[usize], sa: &[usize], sb: &[usize], op: &'static str) -> Result<Bcast> {
        let mut dims: Vec<(usize, usize, usize)> = Vec::new();
        for ((&n, &a), &b) in shape.iter().zip(sa).zip(sb) {
            if n == 1 {
                continue;
            }
            if let Some(last) = dims.last_mut() {
                if last.1 == a * n && last.2 == b * n {
                    *last = (last.0 * n, a, b);
                    continue;
                }
            }
            dims.push((n, a, b));
        }
        if dims.len() > 8 {
            return Err(Error::shape(
                op,
                format!(
                    "cuda supports broadcasts of rank <= 8 (after merging dims), got {shape:?}"
                ),
            ));
        }
        let mut out = Bcast {
            rank: dims.len() as i64,
            ..Default::default()
        };
        for (i, (n, a, b)) in dims.into_iter().enumerate() {
            out.shape[i] = n as i64;
            out.sa[i] = a as i64;
            out.sb[i] = b as i64;
        }
        Ok(out)
    }
}

fn launch_1d(kernel: &str, n: usize, args: &[crate::backend::cuda::Arg<'_>]) -> Result<()> {
    device()?.launch(
        "elementwise.cu",
        kernel,
        (grid_for(n), 1, 1),
        (THREADS as u32, 1, 1),
        0,
        args,
    )
}

/// y = f_op(x) (no autograd).
fn unary_raw(x: &Tensor, op: i64, a: f32, b: f32, name: &'static str) -> Result<Tensor> {
    let sfx = suffix(x.dtype(), name)?;
    let x = x.detach().contiguous()?;
    let out = Tensor::empty_cuda(x.shape(), x.dtype())?;
    let n = x.numel();
    if n == 0 {
        return Ok(out);
    }
    let (px, py, n64) = (x.cuda_ptr()?, out.cuda_ptr()?, n as i64);
    launch_1d(
        &format!("unary_{sfx}"),
        n,
        &[arg(&px), arg(&py), arg(&n64), arg(&op), arg(&a), arg(&b)],
    )?;
    Ok(out)
}

/// dx = g * f'_op(s) (no autograd). `g` is brought to `s`'s dtype and made contiguous.
fn grad_raw(g: &Tensor, s: &Tensor, op: i64, a: f32, b: f32, name: &'static str) -> Result<Tensor> {
    if !g.is_cuda() {
        return Err(Error::msg(format!(
            "{name}: the upstream gradient is on the cpu, the op ran on cuda"
        )));
    }
    let sfx = suffix(s.dtype(), name)?;
    let g = g.detach().to_dtype(s.dtype())?.contiguous()?;
    let s = s.detach().contiguous()?;
    if g.shape() != s.shape() {
        return Err(Error::shape(
            name,
            format!("gradient {:?} for a tensor {:?}", g.shape(), s.shape()),
        ));
    }
    let out = Tensor::empty_cuda(s.shape(), s.dtype())?;
    let n = s.numel();
    if n == 0 {
        return Ok(out);
    }
    let (pg, ps, po, n64) = (g.cuda_ptr()?, s.cuda_ptr()?, out.cuda_ptr()?, n as i64);
    launch_1d(
        &format!("unary_backward_{sfx}"),
        n,
        &[
            arg(&pg),
            arg(&ps),
            arg(&po),
            arg(&n64),
            arg(&op),
            arg(&a),
            arg(&b),
        ],
    )?;
    Ok(out)
}

/// A unary op: forward kernel plus the backward of src/ops/elementwise.rs.
#[derive(Clone, Copy, Debug)]
enum Unary {
    Affine(f64, f64),
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Powf(f64),
    Abs,
    Clamp(f64, f64),
    Sigmoid,
    Tanh,
    Silu,
    Gelu,
}

impl Unary {
    fn name(self) -> &'static str {
        match self {
            Unary::Affine(..) => "affine",
            Unary::Exp => "exp",
            Unary::Log => "log",
            Unary::Sqrt => "sqrt",
            Unary::Rsqrt => "rsqrt",
            Unary::Powf(_) => "powf",
            Unary::Abs => "abs",
            Unary::Clamp(..) => "clamp",
            Unary::Sigmoid => "sigmoid",
            Unary::Tanh => "tanh",
            Unary::Silu => "silu",
            Unary::Gelu => "gelu",
        }
    }

    /// (op code, a, b) of the forward kernel.
    fn forward_code(self) -> (i64, f32, f32) {
        match self {
            Unary::Affine(m, a) => (U_AFFINE, m as f32, a as f32),
            Unary::Exp => (U_EXP, 0.0, 0.0),
            Unary::Log => (U_LOG, 0.0, 0.0),
            Unary::Sqrt => (U_SQRT, 0.0, 0.0),
            Unary::Rsqrt => (U_RSQRT, 0.0, 0.0),
            Unary::Powf(p) => (U_POW, p as f32, 0.0),
            Unary::Abs => (U_ABS, 0.0, 0.0),
            Unary::Clamp(lo, hi) => (U_CLAMP, lo as f32, hi as f32),
            Unary::Sigmoid => (U_SIGMOID, 0.0, 0.0),
            Unary::Tanh => (U_TANH, 0.0, 0.0),
            Unary::Silu => (U_SILU, 0.0, 0.0),
            Unary::Gelu => (U_GELU, 0.0, 0.0),
        }
    }
}

fn unary(x: &Tensor, op: Unary) -> Result<Tensor> {
    let name = op.name();
    let (code, a, b) = op.forward_code();
    let out = unary_raw(x, code, a, b, name)?;
    if !crate::autograd::needs_grad(&[x]) {
        return Ok(out);
    }
    let (xs, y) = (x.clone(), out.clone());
    Ok(record(name, out, &[x], move |g| {
        let dx = match op {
            Unary::Affine(m, _) => g.affine(m, 0.0)?,
            Unary::Exp => g.mul(&y)?,
            Unary::Log => g.div(&xs)?,
            Unary::Sqrt => grad_raw(g, &y, G_SQRT, 0.0, 0.0, "sqrt_backward")?,
            Unary::Rsqrt => grad_raw(g, &xs, G_RSQRT, 0.0, 0.0, "rsqrt_backward")?,
            Unary::Powf(p) => grad_raw(g, &xs, G_POW, p as f32, (p - 1.0) as f32, "powf_backward")?,
            Unary::Abs => grad_raw(g, &xs, G_ABS, 0.0, 0.0, "abs_backward")?,
            Unary::Clamp(lo, hi) => {
                grad_raw(g, &xs, G_CLAMP, lo as f32, hi as f32, "clamp_backward")?
            }
            Unary::Sigmoid => grad_raw(g, &xs, G_SIGMOID, 0.0, 0.0, "sigmoid_backward")?,
            Unary::Tanh => grad_raw(g, &xs, G_TANH, 0.0, 0.0, "tanh_backward")?,
            Unary::Silu => grad_raw(g, &xs, G_SILU, 0.0, 0.0, "silu_backward")?,
            Unary::Gelu => grad_raw(g, &xs, G_GELU, 0.0, 0.0, "gelu_backward")?,
        };
        Ok(vec![Some(dx)])
    }))
}

/// `x * mul + add`.
pub fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    unary(x, Unary::Affine(mul, add))
}
pub fn exp(x: &Tensor) -> Result<Tensor> {
    unary(x, Unary::Exp)
}
pub fn log(x: &Tensor) -> Result<Tensor> {
    unary(x, Unary::Log)
}
pub fn sqrt(x: &Tensor) -> Result<Tensor> {
    unary(x, Unary::Sqrt)
}
pub fn rsqrt(x: &Tensor) -> Result<Tensor> {
    unary(x, Unary::Rsqrt)
}
pub fn powf(x: &Tensor, p: f64) -> Result<Tensor> {
    unary(x, Unary::Powf(p))
}
pub fn abs(x: &Tensor) -> Result<Tensor> {
    unary(x, Unary::Abs)
}
pub fn clamp(x: &Tensor, min: f64, max: f64) -> Result<Tensor> {
    unary(x, Unary::Clamp(min, max))
}
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    unary(x, Unary::Sigmoid)
}
pub fn tanh(x: &Tensor) -> Result<Tensor> {
    unary(x, Unary::Tanh)
}
pub fn silu(x: &Tensor) -> Result<Tensor> {
    unary(x, Unary::Silu)
}
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    unary(x, Unary::Gelu)
}

/// Forward of a binary op (`B_*` code) into a new contiguous tensor of the broadcast `shape`
/// (no autograd: src/ops/elementwise.rs records the device-independent backward). Both inputs
/// must be cuda tensors of the same float dtype.
pub fn binary(
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
    name: &'static str,
    op: i64,
) -> Result<Tensor> {
    if !(a.is_cuda() && b.is_cuda()) {
        return Err(Error::msg(format!(
            "{name}: inputs on different devices ({:?} on {:?}, {:?} on {:?}); move both to the same device",
            a.shape(),
            a.device(),
            b.shape(),
            b.device()
        )));
    }
    if a.dtype() != b.dtype() {
        return Err(Error::msg(format!(
            "{name}: dtype mismatch {} vs {}",
            a.dtype(),
            b.dtype()
        )));
    }
    let sfx = suffix(a.dtype(), name)?;
    let out = Tensor::empty_cuda(shape, a.dtype())?;
    let n = out.numel();
    if n == 0 {
        return Ok(out);
    }
    let (pa, pb, po, n64) = (a.cuda_ptr()?, b.cuda_ptr()?, out.cuda_ptr()?, n as i64);
    if a.shape() == shape && b.shape() == shape && a.is_contiguous() && b.is_contiguous() {
        launch_1d(
            &format!("binary_{sfx}"),
            n,
            &[arg(&pa), arg(&pb), arg(&po), arg(&n64), arg(&op)],
        )?;
    } else {
        let (la, lb) = (
            a.layout().broadcast_as(shape)?,
            b.layout().broadcast_as(shape)?,
        );
        let s = Bcast::new(shape, &la.strides, &lb.strides, name)?;
        launch_1d(
            &format!("binary_strided_{sfx}"),
            n,
            &[arg(&pa), arg(&pb), arg(&po), arg(&s), arg(&n64), arg(&op)],
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Bcast;

    #[test]
    fn bcast_merges_only_when_both_inputs_allow() {
        // [4,3,7] from a [4,1,7] (strides [7,0,1]) and a [3,7] (strides [0,7,1]): nothing merges.
        let s = Bcast::new(&[4, 3, 7], &[7, 0, 1], &[0, 7, 1], "t").unwrap();
        assert_eq!(s.rank, 3);
        // both contiguous: one dim
        let s = Bcast::new(&[2, 3, 4], &[12, 4, 1], &[12, 4, 1], "t").unwrap();
        assert_eq!((s.rank, s.shape[0], s.sa[0], s.sb[0]), (1, 24, 1, 1));
        // a scalar broadcast against a contiguous tensor: one dim, b stride 0
        let s = Bcast::new(&[5, 6], &[6, 1], &[0, 0], "t").unwrap();
        assert_eq!((s.rank, s.shape[0], s.sa[0], s.sb[0]), (1, 30, 1, 0));
        // a bias [7] added to [5, 7]: two dims
        let s = Bcast::new(&[5, 7], &[7, 1], &[0, 1], "t").unwrap();
        assert_eq!((s.rank, s.shape[1], s.sa[0], s.sb[0]), (2, 7, 7, 0));
        // rank-0 output
        let s = Bcast::new(&[], &[], &[], "t").unwrap();
        assert_eq!(s.rank, 0);
    }
}
