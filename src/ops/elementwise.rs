//! Elementwise ops. Unary: neg, exp, log, sqrt, rsqrt, pow, abs, clamp, sigmoid, tanh, silu,
//! gelu (exact erf), affine. Binary with numpy broadcasting: add, sub, mul, div. Shapes: the
//! output has the input's shape (unary) or the broadcast shape (binary).
//! CUDA tensors go to src/backend/cuda/ops/elementwise.rs (unary ops with their backward;
//! binary ops only for the forward, the backward below is device-independent).

use crate::autograd::{needs_grad, record};
use crate::backend::cpu;
use crate::backend::cuda::ops::elementwise as cuda_el;
use crate::tensor::{broadcast_shapes, Float, Tensor};
use crate::{float_dispatch, Result};
use num_traits::{One, Zero};

/// Elementwise map of a float tensor: `$f` is a closure over one element of type `T`.
macro_rules! map1 {
    ($x:expr, $name:expr, |$v:ident : $T:ident| $f:expr) => {{
        let x = $x.contiguous()?;
        float_dispatch!(x.dtype(), $name, $T => {
            let out = x.read::<$T, _>(|s| cpu::map(s, |$v: $T| $f))?;
            Tensor::from_vec(out, x.shape())?
        })
    }};
}

/// Elementwise map of two same-shape float tensors.
macro_rules! map2 {
    ($a:expr, $b:expr, $name:expr, |$x:ident, $y:ident : $T:ident| $f:expr) => {{
        let a = $a.contiguous()?;
        let b = $b.contiguous()?;
        debug_assert_eq!(a.shape(), b.shape());
        float_dispatch!(a.dtype(), $name, $T => {
            let out = a.read::<$T, _>(|sa| b.read::<$T, _>(|sb| cpu::zip_map(sa, sb, |$x: $T, $y: $T| $f)))??;
            Tensor::from_vec(out, a.shape())?
        })
    }};
}
pub(crate) use map1;
#[allow(unused_imports)]
pub(crate) use map2;

#[inline]
fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_fast())
}

/// d gelu(x) / dx with gelu(x) = x Φ(x): Φ(x) + x φ(x).
#[inline]
fn gelu_grad<T: Float>(x: T) -> T {
    let cdf = T::c(0.5) * (T::one() + (x * T::c(std::f64::consts::FRAC_1_SQRT_2)).error_fn());
    let pdf = (T::c(-0.5) * x * x).exp_fast() * T::c(0.398_942_280_401_432_7);
    cdf + x * pdf
}

impl Tensor {
    pub fn neg(&self) -> Result<Tensor> {
        self.affine(-1.0, 0.0)
    }

    /// `x * mul + add`.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::affine(self, mul, add);
        }
        let out = map1!(self, "affine", |v: T| v * T::c(mul) + T::c(add));
        Ok(record("affine", out, &[self], move |g| {
            Ok(vec![Some(g.affine(mul, 0.0)?)])
        }))
    }

    pub fn add_scalar(&self, v: f64) -> Result<Tensor> {
        self.affine(1.0, v)
    }

    pub fn mul_scalar(&self, v: f64) -> Result<Tensor> {
        self.affine(v, 0.0)
    }

    pub fn exp(&self) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::exp(self);
        }
        let out = map1!(self, "exp", |v: T| v.exp_fast());
        let y = out.clone();
        let keep = needs_grad(&[self]);
        Ok(record("exp", out, &[self], move |g| {
            debug_assert!(keep);
            Ok(vec![Some(g.mul(&y)?)])
        }))
    }

    pub fn log(&self) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::log(self);
        }
        let out = map1!(self, "log", |v: T| v.ln());
        let x = self.clone();
        Ok(record("log", out, &[self], move |g| {
            Ok(vec![Some(g.div(&x)?)])
        }))
    }

    pub fn sqrt(&self) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::sqrt(self);
        }
        let out = map1!(self, "sqrt", |v: T| v.sqrt());
        let y = out.clone();
        Ok(record("sqrt", out, &[self], move |g| {
            Ok(vec![Some(map2!(g, y, "sqrt_backward", |g, y: T| g
                * T::c(0.5)
                / y))])
        }))
    }

    pub fn rsqrt(&self) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::rsqrt(self);
        }
        let out = map1!(self, "rsqrt", |v: T| T::one() / v.sqrt());
        let y = out.clone();
        Ok(record("rsqrt", out, &[self], move |g| {
            // d x^-1/2 = -1/2 x^-3/2 = -1/2 y^3
            Ok(vec![Some(map2!(g, y, "rsqrt_backward", |g, y: T| g
                * T::c(-0.5)
                * y
                * y
                * y))])
        }))
    }

    /// `x ^ p` for a scalar exponent.
    pub fn powf(&self, p: f64) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::powf(self, p);
        }
        let out = map1!(self, "powf", |v: T| v.powf(T::c(p)));
        let x = self.clone();
        Ok(record("powf", out, &[self], move |g| {
            Ok(vec![Some(map2!(g, x, "powf_backward", |g, x: T| g
                * T::c(p)
                * x.powf(T::c(p - 1.0))))])
        }))
    }

    pub fn abs(&self) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::abs(self);
        }
        let out = map1!(self, "abs", |v: T| v.abs());
        let x = self.clone();
        Ok(record("abs", out, &[self], move |g| {
            Ok(vec![Some(map2!(
                g,
                x,
                "abs_backward",
                |g, x: T| if x > T::zero() {
                    g
                } else if x < T::zero() {
                    -g
                } else {
                    T::zero()
                }
            ))])
        }))
    }

    /// Clamps into `[min, max]`; the gradient passes where the input was inside.
    pub fn clamp(&self, min: f64, max: f64) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::clamp(self, min, max);
        }
        let out = map1!(self, "clamp", |v: T| v.max(T::c(min)).min(T::c(max)));
        let x = self.clone();
        Ok(record("clamp", out, &[self], move |g| {
            Ok(vec![Some(map2!(g, x, "clamp_backward", |g, x: T| {
                if x >= T::c(min) && x <= T::c(max) {
                    g
                } else {
                    T::zero()
                }
            }))])
        }))
    }

    pub fn sigmoid(&self) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::sigmoid(self);
        }
        let out = map1!(self, "sigmoid", |v: T| sigmoid(v));
        let y = out.clone();
        Ok(record("sigmoid", out, &[self], move |g| {
            Ok(vec![Some(map2!(g, y, "sigmoid_backward", |g, y: T| g
                * y
                * (T::one() - y)))])
        }))
    }

    pub fn tanh(&self) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::tanh(self);
        }
        let out = map1!(self, "tanh", |v: T| v.tanh());
        let y = out.clone();
        Ok(record("tanh", out, &[self], move |g| {
            Ok(vec![Some(
                map2!(g, y, "tanh_backward", |g, y: T| g * (T::one() - y * y))
            )])
        }))
    }

    /// x · sigmoid(x).
    pub fn silu(&self) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::silu(self);
        }
        let out = map1!(self, "silu", |v: T| v * sigmoid(v));
        let x = self.clone();
        Ok(record("silu", out, &[self], move |g| {
            Ok(vec![Some(map2!(g, x, "silu_backward", |g, x: T| {
                let s = sigmoid(x);
                g * s * (T::one() + x * (T::one() - s))
            }))])
        }))
    }

    /// Exact GELU: x · Φ(x) = x/2 · (1 + erf(x/√2)).
    pub fn gelu(&self) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_el::gelu(self);
        }
        let out = map1!(self, "gelu", |v: T| T::c(0.5)
            * v
            * (T::one() + (v * T::c(std::f64::consts::FRAC_1_SQRT_2)).error_fn()));
        let x = self.clone();
        Ok(record("gelu", out, &[self], move |g| {
            Ok(vec![Some(
                map2!(g, x, "gelu_backward", |g, x: T| g * gelu_grad(x))
            )])
        }))
    }

    // ------------------------------------------------------------------ binary

    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        let out = binary(self, rhs, "add", BinOp::Add)?;
        let (sa, sb) = (self.shape().to_vec(), rhs.shape().to_vec());
        Ok(record("add", out, &[self, rhs], move |g| {
            Ok(vec![Some(g.sum_to_shape(&sa)?), Some(g.sum_to_shape(&sb)?)])
        }))
    }

    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        let out = binary(self, rhs, "sub", BinOp::Sub)?;
        let (sa, sb) = (self.shape().to_vec(), rhs.shape().to_vec());
        Ok(record("sub", out, &[self, rhs], move |g| {
            Ok(vec![
                Some(g.sum_to_shape(&sa)?),
                Some(g.neg()?.sum_to_shape(&sb)?),
            ])
        }))
    }

    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        let out = binary(self, rhs, "mul", BinOp::Mul)?;
        let (a, b) = (self.clone(), rhs.clone());
        let grads = [self.requires_grad(), rhs.requires_grad()];
        Ok(record("mul", out, &[self, rhs], move |g| {
            let ga = if grads[0] {
                Some(g.mul(&b)?.sum_to_shape(a.shape())?)
            } else {
                None
            };
            let gb = if grads[1] {
                Some(g.mul(&a)?.sum_to_shape(b.shape())?)
            } else {
                None
            };
            Ok(vec![ga, gb])
        }))
    }

    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        let out = binary(self, rhs, "div", BinOp::Div)?;
        let (a, b) = (self.clone(), rhs.clone());
        let grads = [self.requires_grad(), rhs.requires_grad()];
        Ok(record("div", out, &[self, rhs], move |g| {
            let ga = if grads[0] {
                Some(g.div(&b)?.sum_to_shape(a.shape())?)
            } else {
                None
            };
            let gb = if grads[1] {
                // d(a/b)/db = -a / b^2
                Some(
                    g.mul(&a)?
                        .div(&b.mul(&b)?)?
                        .neg()?
                        .sum_to_shape(b.shape())?,
                )
            } else {
                None
            };
            Ok(vec![ga, gb])
        }))
    }
}

#[derive(Clone, Copy)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    #[inline(always)]
    fn apply<T: Float>(self, a: T, b: T) -> T {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
        }
    }
}

fn binary(a: &Tensor, b: &Tensor, name: &'static str, op: BinOp) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        return Err(crate::Error::msg(format!(
            "{name}: dtype mismatch {} vs {}",
            a.dtype(),
            b.dtype()
        )));
    }
    let shape = broadcast_shapes(name, a.shape(), b.shape())?;
    if a.is_cuda() || b.is_cuda() {
        let code = match op {
            BinOp::Add => cuda_el::B_ADD,
            BinOp::Sub => cuda_el::B_SUB,
            BinOp::Mul => cuda_el::B_MUL,
            BinOp::Div => cuda_el::B_DIV,
        };
        return cuda_el::binary(a, b, &shape, name, code);
    }
    float_dispatch!(a.dtype(), name, T => {
        if a.shape() == b.shape() && a.is_contiguous() && b.is_contiguous() {
            let out = a.read::<T, _>(|x| b.read::<T, _>(|y| cpu::zip_map(x, y, |u, v| op.apply(u, v))))??;
            return Tensor::from_vec(out, &shape);
        }
        let (la, lb) = (a.layout().broadcast_as(&shape)?, b.layout().broadcast_as(&shape)?);
        let out = a.read_strided::<T, _>(|xa, _| b.read_strided::<T, _>(|xb, _| {
            let mut out: Vec<T> = Vec::with_capacity(la.numel());
            let mut rows_b = Vec::new();
            lb.for_each_row(|s, st, _| rows_b.push((s, st)));
            let mut r = 0;
            la.for_each_row(|sa, sta, len| {
                let (sb, stb) = rows_b[r];
                r += 1;
                out.extend((0..len).map(|j| op.apply(xa[sa + j * sta], xb[sb + j * stb])));
            });
            out
        }))??;
        Tensor::from_vec(out, &shape)
    })
}
