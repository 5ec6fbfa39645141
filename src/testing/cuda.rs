//! Comparing an op on CUDA with the CPU backend: same inputs, same random upstream gradient,
//! outputs and every input gradient compared by relative error
//! `max |cuda - cpu| / max(max |cpu|, 1e-6)` (per tensor).

use crate::backend::cuda;
use crate::{grad, DType, Device, Result, Rng, Tensor};

/// What `compare_with_cpu` measured.
#[derive(Debug)]
pub struct Comparison {
    /// Relative error of the output.
    pub output: f64,
    /// Relative error of each input's gradient (None where the input has no gradient).
    pub grads: Vec<Option<f64>>,
}

impl Comparison {
    pub fn worst(&self) -> f64 {
        self.grads
            .iter()
            .flatten()
            .fold(self.output, |a, &b| a.max(b))
    }
}

/// Whether the device is sm_90, so a Hopper kernel's test runs; says why not otherwise.
pub fn hopper_or_skip(name: &str) -> bool {
    let Some(dev) = cuda::device_or_skip(name) else {
        return false;
    };
    if dev.cc != (9, 0) {
        eprintln!("skipped {name}: device is {}, not sm_90", dev.arch());
        return false;
    }
    true
}

/// Relative error of `got` against `want` (any devices/dtypes; compared in f64).
pub fn rel_error(got: &Tensor, want: &Tensor) -> Result<f64> {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    let (g, w) = (got.to_f64s()?, want.to_f64s()?);
    let scale = w.iter().fold(0f64, |a, &v| a.max(v.abs())).max(1e-6);
    let diff = g.iter().zip(&w).fold(0f64, |a, (&x, &y)| {
        if x.is_nan() != y.is_nan() {
            f64::INFINITY
        } else if x.is_nan() || x == y {
            a
        } else {
            a.max((x - y).abs())
        }
    });
    Ok(diff / scale)
}

/// Where `got` differs from `want` by more than `tol` (relative to max |want|), for a kernel
/// whose test failed: both viewed as [rows, cols] with cols the last dimension. Says how many
/// elements are off, the first few, and which 8 x 8 bands of the 64 x 64 tile grid hold them
/// (row band (r % 64) / 8 down, column band (c % 64) / 8 across): a swizzle or fragment-layout
/// error shows as a pattern there, a missing tile or mask as whole rows or columns.
pub fn mismatch_map(got: &Tensor, want: &Tensor, tol: f64) -> Result<String> {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    let cols = *want.shape().last().unwrap_or(&1);
    let (g, w) = (got.to_f64s()?, want.to_f64s()?);
    let scale = w.iter().fold(0f64, |a, &v| a.max(v.abs())).max(1e-6);
    let mut bands = [[0usize; 8]; 8];
    let mut first = Vec::new();
    let mut bad = 0usize;
    let (mut bad_rows, mut bad_cols) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    for (i, (&x, &y)) in g.iter().zip(&w).enumerate() {
        let off = (x - y).abs() / scale > tol || x.is_nan() != y.is_nan();
        if !off {
            continue;
        }
        let (r, c) = (i / cols.max(1), i % cols.max(1));
        bad += 1;
        bands[(r % 64) / 8][(c % 64) / 8] += 1;
        bad_rows.insert(r);
        bad_cols.insert(c);
        if first.len() < 6 {
            first.push(format!("({r}, {c}): {x:.4} vs {y:.4}"));
        }
    }
    let mut out = format!(
        "{bad} of {} elements off by more than {tol:e} (relative), in {} of {} rows and {} of \
         {cols} columns; first: {}\n",
        w.len(),
        bad_rows.len(),
        w.len() / cols.max(1),
        bad_cols.len(),
        first.join(", ")
    );
    out.push_str("  by (row % 64) / 8 down, (col % 64) / 8 across:\n");
    for row in bands {
        let cells: Vec<String> = row.iter().map(|n| format!("{n:>7}")).collect();
        out.push_str(&format!("  {}\n", cells.join("")));
    }
    Ok(out)
}

/// Runs `f` on `inputs` (f32, CPU) and on copies of them on CUDA in `dtype` (f32 or bf16; float
/// inputs are cast, integer inputs kept), backpropagates the same random upstream gradient
/// through both, and compares. `grad_of[i]` says whether input i gets a gradient. The CUDA
/// inputs are made from the CPU ones, so both sides see exactly the same values (for bf16, the
/// CPU side uses the bf16-rounded values too).
pub fn compare_with_cpu(
    inputs: &[Tensor],
    grad_of: &[bool],
    dtype: DType,
    seed: u64,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Comparison> {
    let round = |t: &Tensor| -> Result<Tensor> {
        if t.dtype().is_float() && dtype == DType::BF16 {
            t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
        } else {
            Ok(t.clone())
        }
    };
    let cpu_in: Vec<Tensor> = inputs
        .iter()
        .zip(grad_of)
        .map(|(t, &g)| {
            let t = round(&t.detach())?;
            Ok(if g { t.requires_grad_() } else { t })
        })
        .collect::<Result<_>>()?;
    let cuda_in: Vec<Tensor> = inputs
        .iter()
        .zip(grad_of)
        .map(|(t, &g)| {
            let t = t.detach().to_device(Device::Cuda)?;
            let t = if t.dtype().is_float() {
                t.to_dtype(dtype)?
            } else {
                t
            };
            Ok(if g { t.requires_grad_() } else { t })
        })
        .collect::<Result<_>>()?;
    let want = f(&cpu_in)?;
    let got = f(&cuda_in)?;
    assert!(
        got.is_cuda(),
        "the op returned a cpu tensor for cuda inputs"
    );
    let output = rel_error(&got, &want)?;
    let mut grads = vec![None; inputs.len()];
    if grad_of.iter().any(|&g| g) && want.requires_grad() {
        let upstream = Tensor::randn(want.shape(), 1.0, DType::F32, &mut Rng::new(seed))?;
        let upstream = round(&upstream)?;
        let wrt_cpu: Vec<&Tensor> = cpu_in.iter().collect();
        let wrt_cuda: Vec<&Tensor> = cuda_in.iter().collect();
        let gw = grad(&want, Some(&upstream), &wrt_cpu)?;
        let up_cuda = upstream.to_cuda()?.to_dtype(got.dtype())?;
        let gg = grad(&got, Some(&up_cuda), &wrt_cuda)?;
        for i in 0..inputs.len() {
            if let (Some(a), Some(b)) = (&gg[i], &gw[i]) {
                assert!(a.is_cuda(), "gradient {i} came back on the cpu");
                grads[i] = Some(rel_error(a, b)?);
            }
        }
    }
    Ok(Comparison { output, grads })
}

/// `compare_with_cpu` + assert: every error at most `tol`. Prints the errors. Returns false
/// (after printing that it skipped) when there is no CUDA device.
pub fn assert_close_to_cpu(
    name: &str,
    inputs: &[Tensor],
    grad_of: &[bool],
    dtype: DType,
    tol: f64,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> bool {
    if cuda::device_or_skip(name).is_none() {
        return false;
    }
    let c = compare_with_cpu(inputs, grad_of, dtype, 7, f)
        .unwrap_or_else(|e| panic!("{name} ({dtype}): {e}"));
    println!(
        "{name} {dtype}: output {:.2e} grads {:?}",
        c.output, c.grads
    );
    assert!(
        c.output <= tol,
        "{name} {dtype}: output rel error {:.3e} > {tol:e}",
        c.output
    );
    for (i, g) in c.grads.iter().enumerate() {
        if let Some(g) = g {
            assert!(
                *g <= tol,
                "{name} {dtype}: grad of input {i} rel error {g:.3e} > {tol:e}"
            );
        }
    }
    true
}

/// Tolerance of the CUDA tests for a dtype: f32 1e-5, bf16 1e-2 (the numbers).
pub fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        1e-2
    } else {
        1e-5
    }
}

/// Fresh random normal f32 input on the CPU.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 1.0, DType::F32, &mut Rng::new(seed)).expect("randn")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_map_places_errors_in_their_bands() {
        // 130 x 72: columns 8..16 of rows 64..72 off (row band 0, column band 1), and one NaN.
        let (rows, cols) = (130, 72);
        let want: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut got = want.clone();
        for r in 64..72 {
            for c in 8..16 {
                got[r * cols + c] += 1.0;
            }
        }
        got[129 * cols + 71] = f32::NAN;
        let t = |v: Vec<f32>| Tensor::from_vec(v, &[rows, cols]).unwrap();
        let m = mismatch_map(&t(got), &t(want), 1e-3).unwrap();
        assert!(
            m.starts_with("65 of 9360 elements"),
            "unexpected summary: {m}"
        );
        assert!(m.contains("in 9 of 130 rows and 9 of 72 columns"), "{m}");
        let grid: Vec<Vec<usize>> = m
            .lines()
            .skip(2)
            .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
            .collect();
        assert_eq!(grid[0][1], 64, "{m}");
        assert_eq!(
            grid[0][0], 1,
            "the NaN at (129, 71): band (1 % 64 / 8, 71 % 64 / 8): {m}"
        );
        assert_eq!(grid.iter().flatten().sum::<usize>(), 65, "{m}");
    }
}
