//! Finite-difference gradient checks in f64.
//!
//! For an op `f(x_1..x_n) -> y`, the check draws a fixed random projection `r` of y's shape,
//! takes L = Σ y·r, gets dL/dx_i by autograd, and compares every element with the central
//! difference (L(x + εe) - L(x - εe)) / 2ε. In f64 with ε = 1e-6 the truncation and
//! rounding errors are ~1e-10 relative, so a wrong backward cannot hide.

use crate::autograd::{grad, no_grad};
use crate::{DType, Error, Result, Rng, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct GradCheck {
    pub eps: f64,
    pub atol: f64,
    pub rtol: f64,
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            eps: 1e-6,
            atol: 1e-6,
            rtol: 1e-5,
            seed: 1234,
        }
    }
}

/// `check_grad("op", &inputs, f)` with the default tolerances.
pub fn check_grad(
    name: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    GradCheck::default().check(name, inputs, f)
}

impl GradCheck {
    /// Checks the gradient of `f` with respect to every input (f64 tensors; constants such
    /// as indices or masks are captured by `f`). Errors name the op, input and element.
    pub fn check(
        &self,
        name: &str,
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        for (i, x) in inputs.iter().enumerate() {
            if x.dtype() != DType::F64 {
                return Err(Error::msg(format!(
                    "gradcheck {name}: input {i} is {}, must be f64",
                    x.dtype()
                )));
            }
        }
        let leaves: Vec<Tensor> = inputs.iter().map(|x| x.detach().requires_grad_()).collect();
        let y = f(&leaves)?;
        let mut rng = Rng::new(self.seed);
        let r = Tensor::randn(y.shape(), 1.0, DType::F64, &mut rng)?;
        let loss = y.mul(&r)?.sum_all()?;
        let refs: Vec<&Tensor> = leaves.iter().collect();
        let analytic = grad(&loss, None, &refs)?;

        let objective =
            |xs: &[Tensor]| -> Result<f64> { no_grad(|| f(xs)?.mul(&r)?.sum_all()?.to_scalar()) };
        let values: Vec<Vec<f64>> = inputs.iter().map(|x| x.to_f64s()).collect::<Result<_>>()?;
        for (i, x) in inputs.iter().enumerate() {
            let a = match &analytic[i] {
                Some(g) => {
                    if g.shape() != x.shape() {
                        return Err(Error::msg(format!(
                            "gradcheck {name}: gradient of input {i} has shape {:?}, input {:?}",
                            g.shape(),
                            x.shape()
                        )));
                    }
                    g.to_f64s()?
                }
                None => vec![0.0; x.numel()],
            };
            for j in 0..x.numel() {
                let eval = |delta: f64| -> Result<f64> {
                    let mut v = values[i].clone();
                    v[j] += delta;
                    let mut xs: Vec<Tensor> = inputs.to_vec();
                    xs[i] = Tensor::from_f64s(&v, x.shape(), DType::F64)?;
                    objective(&xs)
                };
                let numeric = (eval(self.eps)? - eval(-self.eps)?) / (2.0 * self.eps);
                if (a[j] - numeric).abs() > self.atol + self.rtol * numeric.abs() {
                    return Err(Error::msg(format!(
                        "gradcheck {name}: input {i} {:?} element {j}: autograd {} vs finite \
                         difference {numeric}",
                        x.shape(),
                        a[j]
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::record;

    #[test]
    fn a_wrong_backward_is_caught() {
        // y = x², with a backward that forgets the factor 2.
        let bad_square = |x: &Tensor| -> Result<Tensor> {
            let out = no_grad(|| x.mul(x))?;
            let xs = x.detach();
            Ok(record("bad_square", out, &[x], move |g| {
                Ok(vec![Some(g.mul(&xs)?)])
            }))
        };
        let x = Tensor::randn(&[4], 1.0, DType::F64, &mut Rng::new(3)).unwrap();
        let err = check_grad("bad_square", std::slice::from_ref(&x), |v| {
            bad_square(&v[0])
        })
        .unwrap_err();
        assert!(err.to_string().contains("bad_square: input 0"), "{err}");
        check_grad("square", &[x], |v| v[0].mul(&v[0])).unwrap();
    }
}
