//! Rotary position embedding on CUDA (kernels/rope.cu), rotate-half convention; the backward is
//! the inverse rotation (the CPU op's `rotate(.., inverse = true)`).
//!
//! x is read in place through its strides when its last dim is contiguous (e.g. the
//! `[B, T, H, D] -> [B, H, T, D]` transposed q/k of the model, or a `narrow` of a fused qkv);
//! cos/sin are read through their broadcast view (e.g. `[B, 1, T, D]` against `[B, H, T, D]`,
//! `[S, 1, D]` against `[S, H, D]`). cos/sin carry no gradient: when they are cpu tensors (the
//! text model builds its tables on the host) they are copied to the device, and when their
//! dtype differs from x's they are cast, once per call.
//!
//! When h = d / 2 is a multiple of 16 / sizeof(dtype) (D % 16 == 0 for bf16, D % 8 == 0 for
//! f32), the x/cos/sin/y pointers are 16-byte aligned and every row stride is a multiple of the
//! vector width, the `rope_vec_*` kernel moves 16-byte chunks (8 bf16 / 4 f32); otherwise the
//! general one-thread-per-pair `rope_*` kernel runs (e.g. an odd head dim or a misaligned view).
//! Under the same conditions, when the rows have a head dim along which cos and sin are
//! broadcast (stride 0, e.g. H of `[B, H, T, D]` against `[T, D]` tables), `rope_heads_*` reads
//! each position's cos/sin chunks once for 4 heads instead of once per row (`HeadsPlan`).

use super::index::on_cuda;
use super::{grid_for, Strides, THREADS};
use crate::autograd::record;
use crate::backend::cuda::kernels::suffix;
use crate::backend::cuda::{arg, device};
use crate::{DType, Error, Result, Tensor};

/// cos or sin as a contiguous cuda tensor of `dtype` (no autograd).
fn table(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let t = t.detach();
    let t = if t.is_cuda() { t } else { t.to_cuda()? };
    let t = if t.dtype() == dtype {
        t
    } else {
        super::cast(&t, dtype)?
    };
    if t.is_contiguous() {
        Ok(t)
    } else {
        super::contiguous(&t)
    }
}

/// Shape and strides of the leading dims (all but the last) of a view: the row offsets.
fn row_strides(t: &Tensor, op: &'static str) -> Result<Strides> {
    let l = t.layout();
    let r = l.shape.len().saturating_sub(1);
    Strides::new(&l.shape[..r], &l.strides[..r], op)
}

/// The rows of x (leading dims `lead`, row strides `x_strides`; y contiguous with rows of `d`)
/// as (position, head) pairs for `rope_heads_*`: the head dim is the longest leading dim with
/// stride 0 in both tables, the position dims are the others.
struct HeadsPlan {
    heads: usize,
    positions: usize,
    /// Element strides of the head dim in x and y.
    x_head: usize,
    y_head: usize,
    /// Row offsets of x, cos, sin and y over the position dims.
    xs: Strides,
    cs: Strides,
    ss: Strides,
    ys: Strides,
}

impl HeadsPlan {
    /// None when no leading dim longer than 1 has stride 0 in both tables.
    fn new(
        lead: &[usize],
        x_strides: &[usize],
        cos_strides: &[usize],
        sin_strides: &[usize],
        d: usize,
    ) -> Result<Option<HeadsPlan>> {
        let head = (0..lead.len())
            .filter(|&i| lead[i] > 1 && cos_strides[i] == 0 && sin_strides[i] == 0)
            .max_by_key(|&i| (lead[i], std::cmp::Reverse(i)));
        let Some(head) = head else {
            return Ok(None);
        };
        let y_strides: Vec<usize> = crate::tensor::contiguous_strides(lead)
            .into_iter()
            .map(|st| st * d)
            .collect();
        let without = |v: &[usize]| -> Vec<usize> {
            v.iter()
                .enumerate()
                .filter(|&(i, _)| i != head)
                .map(|(_, &e)| e)
                .collect()
        };
        let pos_shape = without(lead);
        Ok(Some(HeadsPlan {
            heads: lead[head],
            positions: pos_shape.iter().product(),
            x_head: x_strides[head],
            y_head: y_strides[head],
            xs: Strides::new(&pos_shape, &without(x_strides), "rope")?,
            cs: Strides::new(&pos_shape, &without(cos_strides), "rope")?,
            ss: Strides::new(&pos_shape, &without(sin_strides), "rope")?,
            ys: Strides::new(&pos_shape, &without(&y_strides), "rope")?,
        }))
    }

    /// Threads of `rope_heads_*`: one per (position, group of ROPE_HEADS heads, chunk).
    fn threads(&self, chunks_per_half_row: usize) -> usize {
        self.positions * self.heads.div_ceil(ROPE_HEADS) * chunks_per_half_row
    }
}

/// Heads per thread of `rope_heads_*` (ROPE_HEADS in kernels/rope.cu).
const ROPE_HEADS: usize = 4;

/// The rotation (or its inverse) of the rows of `x` (cuda, any strides) by cos/sin (cuda,
/// contiguous, of x's dtype, broadcastable to x). Contiguous result, no autograd.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    let dtype = cos.dtype();
    let sfx = suffix(dtype, "rope")?;
    let x = if x.is_cuda() {
        x.detach()
    } else {
        x.to_cuda()?
    };
    let x = if x.dtype() == dtype {
        x
    } else {
        super::cast(&x, dtype)?
    };
    let d = *x.shape().last().unwrap_or(&0);
    let x = if d > 1 && x.layout().strides.last() != Some(&1) {
        super::contiguous(&x)?
    } else {
        x
    };
    let cb = cos.broadcast_as(x.shape())?;
    let sb = sin.broadcast_as(x.shape())?;
    if d > 1 && (cb.layout().strides.last() != Some(&1) || sb.layout().strides.last() != Some(&1)) {
        return Err(Error::msg(
            "rope: cos/sin must be contiguous in the last dim",
        ));
    }
    let y = Tensor::empty_cuda(x.shape(), dtype)?;
    let h = d / 2;
    let rows = x.numel().checked_div(d).unwrap_or(0);
    let n = rows * h;
    if n == 0 {
        return Ok(y);
    }
    let (xs, cs, ss) = (
        row_strides(&x, "rope")?,
        row_strides(&cb, "rope")?,
        row_strides(&sb, "rope")?,
    );
    let (xp, cp, sp, yp) = (x.cuda_ptr()?, cb.cuda_ptr()?, sb.cuda_ptr()?, y.cuda_ptr()?);
    let (rows64, h64, inv) = (rows as i64, h as i64, inverse as i64);
    // 16-byte vector path: VEC elements per chunk; h, every row stride and every pointer
    // aligned to it (then each chunk at j and j + h of every row is 16-byte aligned).
    let vec = 16 / dtype.size_in_bytes();
    let strides_ok = |s: &Strides| {
        s.stride[..s.rank as usize]
            .iter()
            .all(|&st| st % vec as i64 == 0)
    };
    let fast = h.is_multiple_of(vec)
        && [xp, cp, sp, yp].iter().all(|p| p.is_multiple_of(16))
        && [&xs, &cs, &ss].into_iter().all(strides_ok);
    if fast {
        let lead = |t: &Tensor| {
            let l = t.layout();
            l.strides[..l.shape.len() - 1].to_vec()
        };
        let lead_shape = &x.shape()[..x.rank() - 1];
        let plan = HeadsPlan::new(lead_shape, &lead(&x), &lead(&cb), &lead(&sb), d)?;
        if let Some(hp) = plan {
            let threads = hp.threads(h / vec);
            if threads <= i32::MAX as usize {
                let (xh, yh, pos, heads) = (
                    hp.x_head as i64,
                    hp.y_head as i64,
                    hp.positions as i64,
                    hp.heads as i64,
                );
                device()?.launch(
                    "rope.cu",
                    &format!("rope_heads_{sfx}"),
                    (threads.div_ceil(THREADS) as u32, 1, 1),
                    (THREADS as u32, 1, 1),
                    0,
                    &[
                        arg(&xp),
                        arg(&hp.xs),
                        arg(&xh),
                        arg(&cp),
                        arg(&hp.cs),
                        arg(&sp),
                        arg(&hp.ss),
                        arg(&yp),
                        arg(&hp.ys),
                        arg(&yh),
                        arg(&pos),
                        arg(&heads),
                        arg(&h64),
                        arg(&inv),
                    ],
                )?;
                return Ok(y);
            }
        }
    }
    let (kernel, items) = if fast {
        (format!("rope_vec_{sfx}"), n / vec)
    } else {
        (format!("rope_{sfx}"), n)
    };
    device()?.launch(
        "rope.cu",
        &kernel,
        (grid_for(items), 1, 1),
        (THREADS as u32, 1, 1),
        0,
        &[
            arg(&xp),
            arg(&xs),
            arg(&cp),
            arg(&cs),
            arg(&sp),
            arg(&ss),
            arg(&yp),
            arg(&rows64),
            arg(&h64),
            arg(&inv),
        ],
    )?;
    Ok(y)
}

/// `x.rope(cos, sin)` for a cuda x (shapes validated by the caller: last dim even, cos and
/// sin of one shape).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    on_cuda("rope", &[x])?;
    let dtype = x.dtype();
    suffix(dtype, "rope")?;
    let (cos, sin) = (table(cos, dtype)?, table(sin, dtype)?);
    let out = rotate(x, &cos, &sin, false)?;
    Ok(record("rope", out, &[x], move |g| {
        Ok(vec![Some(rotate(g, &cos, &sin, true)?)])
    }))
}

#[cfg(test)]
mod tests {
    use super::{HeadsPlan, Strides};

    /// strided_offset of kernels/common.cuh.
    fn offset(mut i: usize, s: &Strides) -> i64 {
        let mut off = 0;
        for d in (0..s.rank as usize).rev() {
            let n = s.shape[d] as usize;
            off += (i % n) as i64 * s.stride[d];
            i /= n;
        }
        off
    }

    /// Every row's (x, cos, sin, y) offsets as `rope_heads_*` computes them from the plan equal
    /// the offsets of the row-major row index over the full leading dims.
    fn check_plan(
        lead: &[usize],
        xst: &[usize],
        cst: &[usize],
        sst: &[usize],
        d: usize,
    ) -> HeadsPlan {
        let p = HeadsPlan::new(lead, xst, cst, sst, d)
            .unwrap()
            .expect("a head dim");
        assert_eq!(p.heads * p.positions, lead.iter().product::<usize>());
        let ycont = crate::tensor::contiguous_strides(lead);
        let mut want: Vec<[i64; 4]> = Vec::new();
        for row in 0..p.heads * p.positions {
            let (mut r, mut o) = (row, [0i64; 4]);
            for i in (0..lead.len()).rev() {
                let k = (r % lead[i]) as i64;
                r /= lead[i];
                o[0] += k * xst[i] as i64;
                o[1] += k * cst[i] as i64;
                o[2] += k * sst[i] as i64;
                o[3] += k * (ycont[i] * d) as i64;
            }
            want.push(o);
        }
        let mut got: Vec<[i64; 4]> = Vec::new();
        for pos in 0..p.positions {
            for k in 0..p.heads as i64 {
                got.push([
                    offset(pos, &p.xs) + k * p.x_head as i64,
                    offset(pos, &p.cs),
                    offset(pos, &p.ss),
                    offset(pos, &p.ys) + k * p.y_head as i64,
                ]);
            }
        }
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want, "{lead:?} {xst:?} {cst:?}");
        p
    }

    #[test]
    fn heads_plan_maps_every_row() {
        // The bench: x [1, 32, T, 128] contiguous, tables [T, 128].
        let t = 64;
        let p = check_plan(
            &[1, 32, t],
            &[32 * t * 128, t * 128, 128],
            &[0, 0, 128],
            &[0, 0, 128],
            128,
        );
        assert_eq!((p.heads, p.positions, p.x_head), (32, t, t * 128));
        // The model's q/k: [B, T, H, D] viewed as [B, H, T, D], tables [B, 1, T, D].
        let p = check_plan(
            &[2, 4, 33],
            &[33 * 4 * 128, 128, 4 * 128],
            &[33 * 128, 0, 128],
            &[33 * 128, 0, 128],
            128,
        );
        assert_eq!(
            (p.heads, p.positions, p.x_head, p.y_head),
            (4, 66, 128, 33 * 128)
        );
        // Vision: x [S, H, D] (a narrow of a fused qkv: row stride 3 H D), tables [S, 1, D].
        check_plan(&[37, 16], &[3 * 16 * 80, 80], &[80, 0], &[80, 0], 80);
        // Two broadcast dims: the longer is the head dim (5 heads, not a multiple of 4).
        let p = check_plan(
            &[3, 5, 7],
            &[5 * 7 * 48, 7 * 48, 48],
            &[0, 0, 48],
            &[0, 0, 48],
            48,
        );
        assert_eq!((p.heads, p.positions), (5, 21));
        // Tables as long as x: no head dim.
        assert!(HeadsPlan::new(&[7], &[64], &[64], &[64], 64)
            .unwrap()
            .is_none());
        assert!(HeadsPlan::new(&[], &[], &[], &[], 64).unwrap().is_none());
        // cos broadcast but sin not: no head dim.
        assert!(
            HeadsPlan::new(&[4, 7], &[448, 64], &[0, 64], &[448, 64], 64)
                .unwrap()
                .is_none()
        );
    }
}
