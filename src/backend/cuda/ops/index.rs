//! Indexing and assembly on CUDA (kernels/index.cu): cat, index_select, gather, where_cond,
//! masked_fill, masked_scatter. `src/ops/index.rs` validates shapes and reads indices on the host,
//! then calls these.
//!
//! Index and mask tensors may live on either device: they are small, so they are read on the
//! host (copied there when on cuda), turned into the i64/u32 arrays the kernels want and
//! uploaded. Data tensors must be on cuda (mixed devices are an error naming the op).
//! Forwards of cat, index_select and gather move raw elements of any dtype (kernels by element
//! size); every backward, and where/masked_fill/masked_scatter, need f32 or bf16.
//! No float atomics: the scatter-add backwards of index_select (embedding) and gather sum each
//! destination's sources in a fixed order, from index lists sorted on the host.
//!
//! Also the small helpers the other op modules of this area share (`upstream`, `upload_i64`,
//! `upload_mask`, `on_cuda`).

use super::{grid_for, Strides, THREADS};
use crate::autograd::record;
use crate::backend::cuda::kernels::suffix;
use crate::backend::cuda::{arg, device};
use crate::{DType, Error, Result, Tensor};

/// Error unless every tensor is on cuda (the data inputs of a cuda op).
pub(crate) fn on_cuda(op: &'static str, tensors: &[&Tensor]) -> Result<()> {
    if tensors.iter().all(|t| t.is_cuda()) {
        return Ok(());
    }
    let devs: Vec<String> = tensors
        .iter()
        .map(|t| format!("{:?} on {}", t.shape(), t.device()))
        .collect();
    Err(Error::msg(format!(
        "{op}: inputs are on different devices ({}); move them to one device first (.to_cuda())",
        devs.join(", ")
    )))
}

/// The upstream gradient of a backward as a contiguous cuda tensor of `dtype`.
pub(crate) fn upstream(g: &Tensor, dtype: DType) -> Result<Tensor> {
    let g = if g.is_cuda() { g.clone() } else { g.to_cuda()? };
    let g = if g.dtype() == dtype {
        g
    } else {
        super::cast(&g, dtype)?
    };
    if g.is_contiguous() {
        Ok(g)
    } else {
        super::contiguous(&g)
    }
}

/// A new contiguous i64 device tensor of `shape` holding `v`.
pub(crate) fn upload_i64(v: &[i64], shape: &[usize]) -> Result<Tensor> {
    let t = Tensor::empty_cuda(shape, DType::I64)?;
    device()?.htod(v, t.cuda_ptr()?)?;
    Ok(t)
}

/// An i64 or u32 index tensor (token ids, targets) as a contiguous cuda tensor that kernels read
/// directly, with its kernel-name tag ("i64" / "u32"; the kernel argument is `const i64*` /
/// `const unsigned int*`, from `cuda_ptr()` of the returned tensor, which must outlive the
/// launch). No host round trip when it is already on cuda (a strided view is copied on the
/// device); a cpu tensor is uploaded. Other dtypes: an error naming `op`.
pub(crate) fn device_ids(ids: &Tensor, op: &'static str) -> Result<(Tensor, &'static str)> {
    let tag = match ids.dtype() {
        DType::I64 => "i64",
        DType::U32 => "u32",
        d => {
            return Err(Error::DType {
                op,
                dtype: d,
                hint: " (targets must be i64 or u32)".into(),
            })
        }
    };
    let t = if ids.is_cuda() {
        ids.detach()
    } else {
        ids.detach().to_cuda()?
    };
    let t = if t.is_contiguous() {
        t
    } else {
        super::contiguous(&t)?
    };
    Ok((t, tag))
}

/// A u32 device tensor of the mask's shape: 1 where `mask` (any dtype, any device) is nonzero.
pub(crate) fn upload_mask(mask: &Tensor) -> Result<Tensor> {
    let m: Vec<u32> = mask.to_mask()?.into_iter().map(u32::from).collect();
    let t = Tensor::empty_cuda(mask.shape(), DType::U32)?;
    device()?.htod(&m, t.cuda_ptr()?)?;
    Ok(t)
}

/// A device tensor's view as contiguous (a copy when strided). No autograd.
fn dense(t: &Tensor) -> Result<Tensor> {
    let t = t.detach();
    if t.is_contiguous() {
        Ok(t)
    } else {
        super::contiguous(&t)
    }
}

/// Kernel-name suffix of the data-movement kernels: bytes per element.
fn size_suffix(dtype: DType, op: &'static str) -> Result<&'static str> {
    match dtype.size_in_bytes() {
        2 => Ok("2"),
        4 => Ok("4"),
        8 => Ok("8"),
        _ => Err(Error::dtype(op, dtype)),
    }
}

fn launch1d(kernel: &str, n: usize, args: &[crate::backend::cuda::Arg<'_>]) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    device()?.launch(
        "index.cu",
        kernel,
        (grid_for(n), 1, 1),
        (THREADS as u32, 1, 1),
        0,
        args,
    )
}

/// (outer, size along dim, inner) of `shape` around `dim`.
fn split_at(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (
        shape[..dim].iter().product(),
        shape[dim],
        shape[dim + 1..].iter().product(),
    )
}

/// Concatenation along `d` into a new tensor of `shape` (validated by the caller); the caller
/// records the backward (views of the gradient). One strided copy per input.
pub fn cat(tensors: &[&Tensor], d: usize, shape: &[usize]) -> Result<Tensor> {
    on_cuda("cat", tensors)?;
    let out = Tensor::empty_cuda(shape, tensors[0].dtype())?;
    let mut start = 0usize;
    for t in tensors {
        copy_into_slice(t, &out, d, start)?;
        start += t.shape()[d];
    }
    Ok(out)
}

/// `t` zero-padded along `d` to `shape` (validated by the caller), its entries from index
/// `before` on: a zeroed output and one strided copy (narrow's backward; no zero tensors to
/// build and read as `cat` would).
pub fn zero_pad(t: &Tensor, d: usize, before: usize, shape: &[usize]) -> Result<Tensor> {
    on_cuda("zero_pad", &[t])?;
    let out = Tensor::zeros_on(shape, t.dtype(), crate::Device::Cuda)?;
    copy_into_slice(t, &out, d, before)?;
    Ok(out)
}

/// Copies `t` (any layout) into the contiguous `out` at index `start` of dim `d` (every other
/// dim as in `out`): one `cat_copy` launch.
fn copy_into_slice(t: &Tensor, out: &Tensor, d: usize, start: usize) -> Result<()> {
    let n = t.numel();
    if n == 0 {
        return Ok(());
    }
    let kernel = format!("cat_copy_{}", size_suffix(t.dtype(), "cat")?);
    let (_, total, inner) = split_at(out.shape(), d);
    let s = Strides::of(t.layout(), "cat")?;
    let (src, dst) = (t.cuda_ptr()?, out.cuda_ptr()?);
    let (n64, block_len, dst_block, dst_off) = (
        n as i64,
        (t.shape()[d] * inner) as i64,
        (total * inner) as i64,
        (start * inner) as i64,
    );
    launch1d(
        &kernel,
        n,
        &[
            arg(&src),
            arg(&s),
            arg(&dst),
            arg(&n64),
            arg(&block_len),
            arg(&dst_block),
            arg(&dst_off),
        ],
    )
}

/// `x.index_select(idx, d)` with host indices `idx` (each < x.shape()[d], checked by the
/// caller). Backward: deterministic scatter-add (CSR of the indices, built on the host).
pub fn index_select(x: &Tensor, idx: Vec<usize>, d: usize) -> Result<Tensor> {
    on_cuda("index_select", &[x])?;
    let dtype = x.dtype();
    let xc = dense(x)?;
    let (outer, size, inner) = split_at(x.shape(), d);
    let k = idx.len();
    let mut shape = x.shape().to_vec();
    shape[d] = k;
    let out = Tensor::empty_cuda(&shape, dtype)?;
    let n = out.numel();
    if n > 0 {
        let ids: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
        let idx_dev = upload_i64(&ids, &[k])?;
        let kernel = format!("index_select_{}", size_suffix(dtype, "index_select")?);
        let (xp, ip, op) = (xc.cuda_ptr()?, idx_dev.cuda_ptr()?, out.cuda_ptr()?);
        let (n64, size64, k64, inner64) = (n as i64, size as i64, k as i64, inner as i64);
        launch1d(
            &kernel,
            n,
            &[
                arg(&xp),
                arg(&ip),
                arg(&op),
                arg(&n64),
                arg(&size64),
                arg(&k64),
                arg(&inner64),
            ],
        )?;
    }
    let in_shape = x.shape().to_vec();
    let idx = std::sync::Arc::new(idx);
    let (idx2, shape2) = (idx.clone(), in_shape.clone());
    Ok(crate::autograd::record_into(
        "index_select",
        out,
        x,
        move |g| {
            let g = upstream(g, dtype)?;
            Ok(vec![Some(select_grad(
                &g,
                &idx,
                (outer, size, inner),
                &in_shape,
                None,
            )?)])
        },
        move |g, total| {
            // Into the input's gradient so far (a tied lm_head's): in place when that gradient
            // is this pass's own, else the new gradient added to it.
            let g = upstream(g, dtype)?;
            let dims = (outer, size, inner);
            if total.can_write_in_place(&shape2, dtype, crate::Device::Cuda) {
                select_grad(&g, &idx2, dims, &shape2, Some(total))
            } else {
                total.add(&select_grad(&g, &idx2, dims, &shape2, None)?)
            }
        },
    ))
}

/// index_select's gradient from the contiguous upstream `g` (dtype of the input): the rows of
/// `g` summed back into the rows they were read from. `into: None`: a new input-shaped tensor;
/// `Some(total)`: `total` plus that gradient, the rows added in place when few enough rows are
/// selected for the rows path (`total` must be writable in place), else the two added.
fn select_grad(
    g: &Tensor,
    idx: &[usize],
    (outer, size, inner): (usize, usize, usize),
    in_shape: &[usize],
    into: Option<Tensor>,
) -> Result<Tensor> {
    let dtype = g.dtype();
    let sfx = suffix(dtype, "index_select_backward")?;
    let k = idx.len();
    // CSR: srcs[starts[s]..starts[s+1]] = the positions kk (increasing) with idx[kk] = s.
    let mut starts = vec![0i64; size + 1];
    for &i in idx {
        starts[i + 1] += 1;
    }
    for s in 0..size {
        starts[s + 1] += starts[s];
    }
    let mut fill: Vec<i64> = starts[..size].to_vec();
    let mut srcs = vec![0i64; k];
    for (kk, &i) in idx.iter().enumerate() {
        srcs[fill[i] as usize] = kk as i64;
        fill[i] += 1;
    }
    // Distinct selected rows. When they are under half the rows (an embedding's gradient),
    // only those are summed, over a zeroed dx (or into `into`), instead of visiting every row.
    let rows: Vec<i64> = (0..size as i64)
        .filter(|&s| starts[s as usize + 1] > starts[s as usize])
        .collect();
    if 2 * rows.len() < size && outer * inner > 0 {
        let (dx, kernel) = match into {
            Some(t) => (t, format!("index_select_bwd_rows_add_{sfx}")),
            None => (
                Tensor::zeros_on(in_shape, dtype, crate::Device::Cuda)?,
                format!("index_select_bwd_rows_{sfx}"),
            ),
        };
        let u = rows.len();
        if u > 0 {
            let mut seg: Vec<i64> = rows.iter().map(|&s| starts[s as usize]).collect();
            seg.push(k as i64);
            let (seg_dev, srcs_dev, rows_dev) = (
                upload_i64(&seg, &[u + 1])?,
                upload_i64(&srcs, &[k])?,
                upload_i64(&rows, &[u])?,
            );
            let n = outer * u * inner;
            let [n64, u64_, size64, k64, inner64] = [n, u, size, k, inner].map(|v| v as i64);
            let (gp, sp, cp, rp, dp) = (
                g.cuda_ptr()?,
                seg_dev.cuda_ptr()?,
                srcs_dev.cuda_ptr()?,
                rows_dev.cuda_ptr()?,
                dx.cuda_ptr()?,
            );
            launch1d(
                &kernel,
                n,
                &[
                    arg(&gp),
                    arg(&sp),
                    arg(&cp),
                    arg(&rp),
                    arg(&dp),
                    arg(&n64),
                    arg(&u64_),
                    arg(&size64),
                    arg(&k64),
                    arg(&inner64),
                ],
            )?;
        }
        return Ok(dx);
    }
    let dx = Tensor::empty_cuda(in_shape, dtype)?;
    let n = dx.numel();
    if n > 0 {
        let starts_dev = upload_i64(&starts, &[size + 1])?;
        let srcs_dev = upload_i64(&srcs, &[k])?;
        let (gp, sp, cp, dp) = (
            g.cuda_ptr()?,
            starts_dev.cuda_ptr()?,
            srcs_dev.cuda_ptr()?,
            dx.cuda_ptr()?,
        );
        let (n64, size64, k64, inner64) = (n as i64, size as i64, k as i64, inner as i64);
        launch1d(
            &format!("index_select_bwd_{sfx}"),
            n,
            &[
                arg(&gp),
                arg(&sp),
                arg(&cp),
                arg(&dp),
                arg(&n64),
                arg(&size64),
                arg(&k64),
                arg(&inner64),
            ],
        )?;
    }
    debug_assert_eq!(outer * size * inner, n);
    match into {
        Some(total) => total.add(&dx),
        None => Ok(dx),
    }
}

/// `x.gather(index, dim)` given `src`, the offset into contiguous x of every output element
/// (computed and range-checked by the caller), and the output (= index) shape. Backward:
/// deterministic scatter-add (sources grouped by destination on the host).
pub fn gather(x: &Tensor, src: Vec<usize>, ishape: &[usize]) -> Result<Tensor> {
    on_cuda("gather", &[x])?;
    let dtype = x.dtype();
    let xc = dense(x)?;
    let out = Tensor::empty_cuda(ishape, dtype)?;
    let n = out.numel();
    if n > 0 {
        let offs: Vec<i64> = src.iter().map(|&o| o as i64).collect();
        let src_dev = upload_i64(&offs, &[n])?;
        let kernel = format!("gather_{}", size_suffix(dtype, "gather")?);
        let (xp, sp, op, n64) = (
            xc.cuda_ptr()?,
            src_dev.cuda_ptr()?,
            out.cuda_ptr()?,
            n as i64,
        );
        launch1d(&kernel, n, &[arg(&xp), arg(&sp), arg(&op), arg(&n64)])?;
    }
    let in_shape = x.shape().to_vec();
    Ok(record("gather", out, &[x], move |g| {
        let sfx = suffix(dtype, "gather_backward")?;
        let g = upstream(g, dtype)?;
        let dx = Tensor::zeros_on(&in_shape, dtype, crate::Device::Cuda)?;
        if !src.is_empty() {
            // Output positions sorted by destination (stable: increasing position within one).
            let mut order: Vec<usize> = (0..src.len()).collect();
            order.sort_by_key(|&k| src[k]);
            let (mut seg, mut dst) = (Vec::new(), Vec::new());
            for (p, &k) in order.iter().enumerate() {
                if p == 0 || src[k] != src[order[p - 1]] {
                    seg.push(p as i64);
                    dst.push(src[k] as i64);
                }
            }
            seg.push(order.len() as i64);
            let u = dst.len();
            let order: Vec<i64> = order.into_iter().map(|k| k as i64).collect();
            let seg_dev = upload_i64(&seg, &[u + 1])?;
            let order_dev = upload_i64(&order, &[order.len()])?;
            let dst_dev = upload_i64(&dst, &[u])?;
            let (gp, sp, op, tp, dp) = (
                g.cuda_ptr()?,
                seg_dev.cuda_ptr()?,
                order_dev.cuda_ptr()?,
                dst_dev.cuda_ptr()?,
                dx.cuda_ptr()?,
            );
            let u64_ = u as i64;
            launch1d(
                &format!("gather_bwd_{sfx}"),
                u,
                &[arg(&gp), arg(&sp), arg(&op), arg(&tp), arg(&dp), arg(&u64_)],
            )?;
        }
        Ok(vec![Some(dx)])
    }))
}

/// `cond ? a : b` broadcast to `shape` (the caller checked the shapes broadcast). `cond`: any
/// dtype and device (read on the host); a and b on cuda, same float dtype.
pub fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor, shape: &[usize]) -> Result<Tensor> {
    on_cuda("where", &[a, b])?;
    if a.dtype() != b.dtype() {
        return Err(Error::msg(format!(
            "where: a is {} but b is {}",
            a.dtype(),
            b.dtype()
        )));
    }
    let dtype = a.dtype();
    let sfx = suffix(dtype, "where")?;
    let mask = upload_mask(cond)?;
    let ms = Strides::of(mask.broadcast_as(shape)?.layout(), "where")?;
    let (ad, bd) = (
        a.detach().broadcast_as(shape)?,
        b.detach().broadcast_as(shape)?,
    );
    let (sa, sb) = (
        Strides::of(ad.layout(), "where")?,
        Strides::of(bd.layout(), "where")?,
    );
    let out = Tensor::empty_cuda(shape, dtype)?;
    let n = out.numel();
    if n > 0 {
        let (mp, ap, bp, op, n64) = (
            mask.cuda_ptr()?,
            ad.cuda_ptr()?,
            bd.cuda_ptr()?,
            out.cuda_ptr()?,
            n as i64,
        );
        launch1d(
            &format!("where_fwd_{sfx}"),
            n,
            &[
                arg(&mp),
                arg(&ms),
                arg(&ap),
                arg(&sa),
                arg(&bp),
                arg(&sb),
                arg(&op),
                arg(&n64),
            ],
        )?;
    }
    let (shape_a, shape_b) = (a.shape().to_vec(), b.shape().to_vec());
    let (want_a, want_b) = (a.requires_grad(), b.requires_grad());
    let out_shape = shape.to_vec();
    Ok(record("where", out, &[a, b], move |g| {
        let g = if g.is_cuda() { g.clone() } else { g.to_cuda()? };
        let g = if g.dtype() == dtype {
            g
        } else {
            super::cast(&g, dtype)?
        };
        let gs = Strides::of(g.layout(), "where_backward")?;
        let ga = if want_a {
            Some(Tensor::empty_cuda(&out_shape, dtype)?)
        } else {
            None
        };
        let gb = if want_b {
            Some(Tensor::empty_cuda(&out_shape, dtype)?)
        } else {
            None
        };
        let n = g.numel();
        if n > 0 {
            let ptr = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0), |t| t.cuda_ptr());
            let (mp, gp, ap, bp) = (mask.cuda_ptr()?, g.cuda_ptr()?, ptr(&ga)?, ptr(&gb)?);
            let (n64, wa, wb) = (n as i64, want_a as i64, want_b as i64);
            launch1d(
                &format!("where_bwd_{sfx}"),
                n,
                &[
                    arg(&mp),
                    arg(&ms),
                    arg(&gp),
                    arg(&gs),
                    arg(&ap),
                    arg(&bp),
                    arg(&n64),
                    arg(&wa),
                    arg(&wb),
                ],
            )?;
        }
        Ok(vec![
            ga.map(|t| t.sum_to_shape(&shape_a)).transpose()?,
            gb.map(|t| t.sum_to_shape(&shape_b)).transpose()?,
        ])
    }))
}

/// `value` where `mask` (broadcastable to x, any dtype and device) is nonzero, else x.
pub fn masked_fill(x: &Tensor, mask: &Tensor, value: f64) -> Result<Tensor> {
    on_cuda("masked_fill", &[x])?;
    let dtype = x.dtype();
    let sfx = suffix(dtype, "masked_fill")?;
    let m = upload_mask(mask)?;
    let ms = Strides::of(m.broadcast_as(x.shape())?.layout(), "masked_fill")?;
    let fill = move |src: &Tensor, value: f32| -> Result<Tensor> {
        let out = Tensor::empty_cuda(src.shape(), dtype)?;
        let n = out.numel();
        if n > 0 {
            let xs = Strides::of(src.layout(), "masked_fill")?;
            let (mp, xp, op, n64) = (m.cuda_ptr()?, src.cuda_ptr()?, out.cuda_ptr()?, n as i64);
            launch1d(
                &format!("masked_fill_{sfx}"),
                n,
                &[
                    arg(&mp),
                    arg(&ms),
                    arg(&xp),
                    arg(&xs),
                    arg(&op),
                    arg(&value),
                    arg(&n64),
                ],
            )?;
        }
        Ok(out)
    };
    let out = fill(&x.detach(), value as f32)?;
    Ok(record("masked_fill", out, &[x], move |g| {
        let g = if g.is_cuda() { g.clone() } else { g.to_cuda()? };
        let g = if g.dtype() == dtype {
            g
        } else {
            super::cast(&g, dtype)?
        };
        Ok(vec![Some(fill(&g, 0.0)?)])
    }))
}

/// HF masked_scatter: the positions where `mask` (broadcastable to x, any dtype and device) is
/// set take consecutive elements of `source` in row-major order.
///
/// The mask is read on the host. The trailing dims over which it broadcasts (e.g. the hidden
/// dim of a [B, T, 1] image-token mask against [B, T, D] embeddings) form "rows" of `inner`
/// elements; the host computes, per row, the index of its first source row (a prefix sum of
/// the set rows, −1 for unset rows), so only B·T entries are uploaded.
pub fn masked_scatter(x: &Tensor, mask: &Tensor, source: &Tensor) -> Result<Tensor> {
    on_cuda("masked_scatter", &[x, source])?;
    let dtype = x.dtype();
    if source.dtype() != dtype {
        return Err(Error::msg(format!(
            "masked_scatter: x is {dtype} but source is {}",
            source.dtype()
        )));
    }
    let sfx = suffix(dtype, "masked_scatter")?;
    let shape = x.shape().to_vec();
    let mb = mask.detach().broadcast_as(&shape)?;
    let n = x.numel();
    // Trailing dims over which the mask is constant.
    let mut split = shape.len();
    while split > 0 && (mb.layout().strides[split - 1] == 0 || shape[split - 1] == 1) {
        split -= 1;
    }
    let inner: usize = shape[split..].iter().product();
    let row_mask: Vec<bool> = if n == 0 {
        Vec::new()
    } else {
        let mut v = mb;
        for d in split..shape.len() {
            v = v.narrow(d as isize, 0, 1)?;
        }
        v.to_mask()?
    };
    let mut rowsrc = Vec::with_capacity(row_mask.len());
    let mut set_rows = 0i64;
    for &m in &row_mask {
        if m {
            rowsrc.push(set_rows);
            set_rows += 1;
        } else {
            rowsrc.push(-1);
        }
    }
    let count = set_rows as usize * inner;
    if source.numel() < count {
        return Err(Error::shape(
            "masked_scatter",
            format!(
                "mask selects {count} elements but source {:?} has only {}",
                source.shape(),
                source.numel()
            ),
        ));
    }
    let rows = rowsrc.len();
    let rowsrc = upload_i64(&rowsrc, &[rows])?;
    let (xc, sc) = (dense(x)?, dense(source)?);
    let out = Tensor::empty_cuda(&shape, dtype)?;
    let inner64 = inner as i64;
    if n > 0 {
        let (xp, rp, sp, op, n64) = (
            xc.cuda_ptr()?,
            rowsrc.cuda_ptr()?,
            sc.cuda_ptr()?,
            out.cuda_ptr()?,
            n as i64,
        );
        launch1d(
            &format!("masked_scatter_fwd_{sfx}"),
            n,
            &[
                arg(&xp),
                arg(&rp),
                arg(&sp),
                arg(&op),
                arg(&n64),
                arg(&inner64),
            ],
        )?;
    }
    let src_shape = source.shape().to_vec();
    Ok(record("masked_scatter", out, &[x, source], move |g| {
        let g = upstream(g, dtype)?;
        let gx = Tensor::empty_cuda(&shape, dtype)?;
        let gs = Tensor::zeros_on(&src_shape, dtype, crate::Device::Cuda)?;
        let n = g.numel();
        if n > 0 {
            let (gp, rp, xp, sp, n64) = (
                g.cuda_ptr()?,
                rowsrc.cuda_ptr()?,
                gx.cuda_ptr()?,
                gs.cuda_ptr()?,
                n as i64,
            );
            launch1d(
                &format!("masked_scatter_bwd_{sfx}"),
                n,
                &[
                    arg(&gp),
                    arg(&rp),
                    arg(&xp),
                    arg(&sp),
                    arg(&n64),
                    arg(&inner64),
                ],
            )?;
        }
        Ok(vec![Some(gx), Some(gs)])
    }))
}
