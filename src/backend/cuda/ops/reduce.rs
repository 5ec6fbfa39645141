//! CUDA reductions (sum, max, logsumexp over dims; mean composes sum and affine) and
//! softmax / log_softmax along a dim, with fused backward kernels (kernels/reduce.cu).
//!
//! Every op views its (contiguous) input as `[outer, n, inner]` and works on the middle dim:
//! a single dim, or several dims that are adjacent, need no copy beyond `contiguous`; other
//! dim sets are permuted last and copied first (like the CPU's `rows_last`).
//! Kernel choice for the reductions: `reduce_cols` (blocks of 32 columns, coalesced) when
//! inner >= 32, else `reduce_rows`: one warp per row for rows of up to 2048 elements, one
//! block (256 threads, 1024 from 65536 elements) per row above.
//!
//! Backward rules mirror src/ops/reduce.rs: sum broadcasts the gradient; max sends it to the
//! first maximal element of each row; logsumexp multiplies it by softmax(x), recomputed in f32
//! from x (not from the saved, possibly bf16, logsumexp); softmax dx = y (g - Σ g y),
//! log_softmax dx = g - exp(y) Σ g.
//!
//! softmax / log_softmax over the last dim (inner = 1) take a vectorised fast path when the row
//! length is a multiple of a 16-byte vector (8 bf16 / 4 f32), the pointers are 16-byte aligned
//! and the row fits in registers (`RowVec`: up to 32768 bf16 / 16384 f32 elements): one read
//! of x (forward) or of y and g (backward) with 16-byte loads and stores, one warp per row for
//! short rows and one block per row otherwise. Other cases use the looping row kernels.

use crate::autograd::{needs_grad, record};
use crate::backend::cuda::{arg, blocks_for, device, kernels::suffix, Arg};
use crate::{Error, Result, Tensor};

const R_SUM: i64 = 0;
const R_MAX: i64 = 1;
const R_LSE: i64 = 2;

/// The input as a contiguous `[outer, n, inner]` tensor reduced over the middle dim.
struct Plan {
    /// Contiguous, detached; the reduced dims in the middle (or last after a permutation).
    x: Tensor,
    outer: usize,
    n: usize,
    inner: usize,
    /// The input's shape with the reduced dims set to 1.
    keep_shape: Vec<usize>,
}

impl Plan {
    fn new(x: &Tensor, dims: &[usize], op: &'static str) -> Result<Plan> {
        let (shape, r) = (x.shape(), x.rank());
        let mut sorted = dims.to_vec();
        sorted.sort_unstable();
        if let Some(&d) = sorted.iter().find(|&&d| d >= r) {
            return Err(Error::shape(
                op,
                format!("dim {d} out of range for {shape:?}"),
            ));
        }
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::shape(op, format!("dims {dims:?} name a dim twice")));
        }
        let keep_shape: Vec<usize> = (0..r)
            .map(|d| if sorted.contains(&d) { 1 } else { shape[d] })
            .collect();
        let n: usize = sorted.iter().map(|&d| shape[d]).product();
        let prod = |ds: &[usize]| ds.iter().product::<usize>();
        let x = x.detach();
        let adjacent = match (sorted.first(), sorted.last()) {
            (Some(&lo), Some(&hi)) => hi - lo + 1 == sorted.len(),
            _ => true,
        };
        if adjacent {
            let (lo, hi) = match (sorted.first(), sorted.last()) {
                (Some(&lo), Some(&hi)) => (lo, hi + 1),
                _ => (r, r),
            };
            Ok(Plan {
                x: x.contiguous()?,
                outer: prod(&shape[..lo]),
                n,
                inner: prod(&shape[hi..]),
                keep_shape,
            })
        } else {
            let mut perm: Vec<usize> = (0..r).filter(|d| !sorted.contains(d)).collect();
            let outer = perm.iter().map(|&d| shape[d]).product();
            perm.extend(sorted.iter().copied());
            Ok(Plan {
                x: x.permute(&perm)?.contiguous()?,
                outer,
                n,
                inner: 1,
                keep_shape,
            })
        }
    }

    fn rows(&self) -> usize {
        self.outer * self.inner
    }

    fn dims64(&self) -> (i64, i64, i64) {
        (self.rows() as i64, self.n as i64, self.inner as i64)
    }
}

use crate::ops::reduce::out_shape;

fn grid_x(blocks: usize, op: &'static str) -> Result<u32> {
    if blocks > i32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("{blocks} blocks exceed the cuda grid limit"),
        ));
    }
    Ok(blocks as u32)
}

/// A cuda launch dimension (x, y, z).
pub(crate) type Dim3 = (u32, u32, u32);

/// Launch shape of the vectorised row kernels (`*_v{vpt}_*` in kernels/norm.cu, reduce.cu and
/// loss.cu): each thread of a row holds `vpt` 16-byte vectors of it in registers (vectors
/// `t + k * threads`, k < vpt). `threads` = 32: one warp per row, `rows_per_block` rows per
/// block; more: one block per row (`rows_per_block` = 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowVec {
    pub vpt: usize,
    pub threads: u32,
    pub rows_per_block: u32,
}

impl RowVec {
    /// The plan for contiguous rows of `n` elements of `elem_bytes` bytes, the rows of every
    /// tensor starting at the device addresses `ptrs` (+ a multiple of the row length), at most
    /// `max_vpt` (1, 2, 4 or 8) vectors per thread. None (the caller falls back to its looping
    /// kernel) when `n` is not a multiple of a 16-byte vector, a pointer is not 16-byte aligned,
    /// or the row needs more than 512 threads of 8 vectors.
    /// The kernels' launch bounds rely on: at most 256 threads per block for vpt <= 4, 512 for
    /// vpt = 8.
    pub(crate) fn plan(
        n: usize,
        elem_bytes: usize,
        max_vpt: usize,
        ptrs: &[u64],
    ) -> Option<RowVec> {
        let per = 16 / elem_bytes.clamp(1, 16);
        if n == 0 || !n.is_multiple_of(per) || ptrs.iter().any(|&p| !p.is_multiple_of(16)) {
            return None;
        }
        let nv = n / per;
        let round32 = |t: usize| (t.div_ceil(32) * 32) as u32;
        // Short rows: one warp per row, 8 rows per block.
        for vpt in [1, 2, 4] {
            if vpt <= max_vpt && nv <= 32 * vpt {
                return Some(RowVec {
                    vpt,
                    threads: 32,
                    rows_per_block: 8,
                });
            }
        }
        // One block of at most 256 threads per row, then of at most 512 with 8 vectors each.
        for vpt in [1, 2, 4] {
            if vpt <= max_vpt && nv <= 256 * vpt {
                return Some(RowVec {
                    vpt,
                    threads: round32(nv.div_ceil(vpt)),
                    rows_per_block: 1,
                });
            }
        }
        if max_vpt >= 8 && nv <= 512 * 8 {
            return Some(RowVec {
                vpt: 8,
                threads: round32(nv.div_ceil(8)),
                rows_per_block: 1,
            });
        }
        None
    }

    /// (grid, block) covering `rows` rows.
    pub(crate) fn dims(&self, rows: usize, op: &'static str) -> Result<(Dim3, Dim3)> {
        let blocks = rows.div_ceil(self.rows_per_block as usize);
        Ok((
            (grid_x(blocks, op)?, 1, 1),
            (self.threads, self.rows_per_block, 1),
        ))
    }
}

/// Launches a row kernel of kernels/reduce.cu over `rows` rows of `n` elements: one warp per
/// row (8 rows per block) up to 2048 elements, else one block per row.
fn launch_rows(
    kernel: &str,
    rows: usize,
    n: usize,
    op: &'static str,
    args: &[Arg<'_>],
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let (grid, block) = if n <= 2048 {
        (blocks_for(rows, 8), (32, 8, 1))
    } else {
        (
            grid_x(rows, op)?,
            (if n >= 65536 { 1024 } else { 256 }, 1, 1),
        )
    };
    device()?.launch("reduce.cu", kernel, (grid, 1, 1), block, 0, args)
}

/// One value per row of the plan (`R_*` op), shaped `shape`.
fn reduce(p: &Plan, shape: &[usize], op: i64, name: &'static str) -> Result<Tensor> {
    let sfx = suffix(p.x.dtype(), name)?;
    let out = Tensor::empty_cuda(shape, p.x.dtype())?;
    if p.rows() == 0 {
        return Ok(out);
    }
    let (px, po) = (p.x.cuda_ptr()?, out.cuda_ptr()?);
    if p.inner >= 32 {
        let (outer, n, inner) = (p.outer as i64, p.n as i64, p.inner as i64);
        let grid = grid_x(p.outer * p.inner.div_ceil(32), name)?;
        let by = p.n.clamp(1, 32) as u32;
        device()?.launch(
            "reduce.cu",
            &format!("reduce_cols_{sfx}"),
            (grid, 1, 1),
            (32, by, 1),
            0,
            &[
                arg(&px),
                arg(&po),
                arg(&outer),
                arg(&n),
                arg(&inner),
                arg(&op),
            ],
        )?;
    } else {
        let (rows, n, inner) = p.dims64();
        launch_rows(
            &format!("reduce_rows_{sfx}"),
            p.rows(),
            p.n,
            name,
            &[
                arg(&px),
                arg(&po),
                arg(&rows),
                arg(&n),
                arg(&inner),
                arg(&op),
            ],
        )?;
    }
    Ok(out)
}

/// The upstream gradient as a contiguous cuda tensor of `dtype`.
fn upstream(g: &Tensor, dtype: crate::DType, name: &'static str) -> Result<Tensor> {
    if !g.is_cuda() {
        return Err(Error::msg(format!(
            "{name}: the upstream gradient is on the cpu, the op ran on cuda"
        )));
    }
    g.detach().to_dtype(dtype)?.contiguous()
}

/// Sum over `dims`.
pub fn sum_dims(x: &Tensor, dims: &[usize], keepdim: bool) -> Result<Tensor> {
    let p = Plan::new(x, dims, "sum")?;
    let shape = out_shape(&p.keep_shape, dims, keepdim);
    let out = reduce(&p, &shape, R_SUM, "sum")?;
    let (keep_shape, in_shape) = (p.keep_shape, x.shape().to_vec());
    Ok(record("sum", out, &[x], move |g| {
        Ok(vec![Some(
            g.reshape(&keep_shape)?
                .broadcast_as(&in_shape)?
                .contiguous()?,
        )])
    }))
}

/// Maximum over dim `d` (already normalised). The gradient goes to the first maximal element.
pub fn max(x: &Tensor, d: usize, keepdim: bool) -> Result<Tensor> {
    let p = Plan::new(x, &[d], "max")?;
    if p.n == 0 {
        return Err(Error::shape(
            "max",
            format!("empty dim {d} of {:?}", x.shape()),
        ));
    }
    let shape = out_shape(&p.keep_shape, &[d], keepdim);
    let out = reduce(&p, &shape, R_MAX, "max")?;
    if !needs_grad(&[x]) {
        return Ok(out);
    }
    let xs = x.clone();
    Ok(record("max", out, &[x], move |g| {
        let p = Plan::new(&xs, &[d], "max")?;
        let sfx = suffix(p.x.dtype(), "max_backward")?;
        let g = upstream(g, p.x.dtype(), "max_backward")?.reshape(&p.keep_shape)?;
        let dx = Tensor::empty_cuda(xs.shape(), p.x.dtype())?;
        let (px, pg, pd) = (p.x.cuda_ptr()?, g.cuda_ptr()?, dx.cuda_ptr()?);
        let (rows, n, inner) = p.dims64();
        launch_rows(
            &format!("max_backward_{sfx}"),
            p.rows(),
            p.n,
            "max_backward",
            &[
                arg(&px),
                arg(&pg),
                arg(&pd),
                arg(&rows),
                arg(&n),
                arg(&inner),
            ],
        )?;
        Ok(vec![Some(dx)])
    }))
}

/// log Σ exp over dim `d` (already normalised), stable.
pub fn logsumexp(x: &Tensor, d: usize, keepdim: bool) -> Result<Tensor> {
    let p = Plan::new(x, &[d], "logsumexp")?;
    let shape = out_shape(&p.keep_shape, &[d], keepdim);
    let out = reduce(&p, &shape, R_LSE, "logsumexp")?;
    if !needs_grad(&[x]) {
        return Ok(out);
    }
    let xs = x.clone();
    Ok(record("logsumexp", out, &[x], move |g| {
        let p = Plan::new(&xs, &[d], "logsumexp")?;
        let sfx = suffix(p.x.dtype(), "logsumexp_backward")?;
        let g = upstream(g, p.x.dtype(), "logsumexp_backward")?.reshape(&p.keep_shape)?;
        let dx = Tensor::empty_cuda(xs.shape(), p.x.dtype())?;
        if p.n > 0 {
            let (px, pg, pd) = (p.x.cuda_ptr()?, g.cuda_ptr()?, dx.cuda_ptr()?);
            let (rows, n, inner) = p.dims64();
            launch_rows(
                &format!("logsumexp_backward_{sfx}"),
                p.rows(),
                p.n,
                "logsumexp_backward",
                &[
                    arg(&px),
                    arg(&pg),
                    arg(&pd),
                    arg(&rows),
                    arg(&n),
                    arg(&inner),
                ],
            )?;
        }
        Ok(vec![Some(dx)])
    }))
}

/// Softmax along dim `d` (already normalised).
pub fn softmax(x: &Tensor, d: usize) -> Result<Tensor> {
    softmax_impl(x, d, false)
}

/// log-softmax along dim `d` (already normalised).
pub fn log_softmax(x: &Tensor, d: usize) -> Result<Tensor> {
    softmax_impl(x, d, true)
}

fn softmax_impl(x: &Tensor, d: usize, log: bool) -> Result<Tensor> {
    let name = if log { "log_softmax" } else { "softmax" };
    let p = Plan::new(x, &[d], name)?;
    let sfx = suffix(p.x.dtype(), name)?;
    let dtype = p.x.dtype();
    let y = Tensor::empty_cuda(x.shape(), dtype)?;
    let (rows, n, inner) = p.dims64();
    let log64 = log as i64;
    let elem = dtype.size_in_bytes();
    if p.n > 0 && p.rows() > 0 {
        let (px, py) = (p.x.cuda_ptr()?, y.cuda_ptr()?);
        match RowVec::plan(p.n, elem, 8, &[px, py]).filter(|_| p.inner == 1) {
            Some(pl) => {
                let (grid, block) = pl.dims(p.rows(), name)?;
                device()?.launch(
                    "reduce.cu",
                    &format!("softmax_v{}_{sfx}", pl.vpt),
                    grid,
                    block,
                    0,
                    &[arg(&px), arg(&py), arg(&rows), arg(&n), arg(&log64)],
                )?;
            }
            None => launch_rows(
                &format!("softmax_{sfx}"),
                p.rows(),
                p.n,
                name,
                &[
                    arg(&px),
                    arg(&py),
                    arg(&rows),
                    arg(&n),
                    arg(&inner),
                    arg(&log64),
                ],
            )?,
        }
    }
    if !needs_grad(&[x]) {
        return Ok(y);
    }
    let (saved, nrows, len) = (y.clone(), p.rows(), p.n);
    let bw: &'static str = if log {
        "log_softmax_backward"
    } else {
        "softmax_backward"
    };
    Ok(record(name, y, &[x], move |g| {
        let g = upstream(g, dtype, bw)?;
        let dx = Tensor::empty_cuda(saved.shape(), dtype)?;
        if len > 0 && nrows > 0 {
            let (py, pg, pd) = (saved.cuda_ptr()?, g.cuda_ptr()?, dx.cuda_ptr()?);
            match RowVec::plan(len, elem, 8, &[py, pg, pd]).filter(|_| inner == 1) {
                Some(pl) => {
                    let (grid, block) = pl.dims(nrows, bw)?;
                    device()?.launch(
                        "reduce.cu",
                        &format!("softmax_backward_v{}_{sfx}", pl.vpt),
                        grid,
                        block,
                        0,
                        &[
                            arg(&py),
                            arg(&pg),
                            arg(&pd),
                            arg(&rows),
                            arg(&n),
                            arg(&log64),
                        ],
                    )?;
                }
                None => launch_rows(
                    &format!("softmax_backward_{sfx}"),
                    nrows,
                    len,
                    bw,
                    &[
                        arg(&py),
                        arg(&pg),
                        arg(&pd),
                        arg(&rows),
                        arg(&n),
                        arg(&inner),
                        arg(&log64),
                    ],
                )?,
            }
        }
        Ok(vec![Some(dx)])
    }))
}

#[cfg(test)]
mod tests {
    use super::RowVec;

    /// The invariants the vectorised row kernels rely on, for every row length up to 40000 of
    /// both element sizes: the threads of a row cover all its vectors, warp mode is 32 threads,
    /// block mode a multiple of 32 within the kernels' launch bounds.
    #[test]
    fn row_vec_plan_covers_rows_within_launch_bounds() {
        for elem in [2usize, 4] {
            let per = 16 / elem;
            for n in 1..40000usize {
                let Some(p) = RowVec::plan(n, elem, 8, &[256, 4096]) else {
                    assert!(
                        n % per != 0 || n / per > 512 * 8,
                        "no plan for {n} x {elem}"
                    );
                    continue;
                };
                assert_eq!(n % per, 0);
                let nv = n / per;
                assert!(p.threads as usize * p.vpt >= nv, "{n} x {elem}: {p:?}");
                assert!([1, 2, 4, 8].contains(&p.vpt));
                assert_eq!(p.threads % 32, 0);
                if p.threads == 32 {
                    assert_eq!(p.rows_per_block, 8);
                    assert!(p.vpt <= 4);
                } else {
                    assert_eq!(p.rows_per_block, 1);
                }
                let max_threads = if p.vpt == 8 { 512 } else { 256 };
                assert!(p.threads <= max_threads, "{n} x {elem}: {p:?}");
            }
        }
        // The bench shape: bf16 rows of 4096 on 256 threads of 2 vectors.
        assert_eq!(
            RowVec::plan(4096, 2, 8, &[0]),
            Some(RowVec {
                vpt: 2,
                threads: 256,
                rows_per_block: 1
            })
        );
        // Misaligned pointers and odd lengths fall back.
        assert_eq!(RowVec::plan(4096, 2, 8, &[0, 2]), None);
        assert_eq!(RowVec::plan(1001, 4, 8, &[0]), None);
        assert_eq!(RowVec::plan(151936, 2, 8, &[0]), None);
    }
}
