//! CUDA implementations of the ops. Each `src/ops/*.rs` op checks `is_cuda()` on its input and
//! calls the function of the same name here, which launches the kernels of `kernels/<file>`
//! and records the same backward semantics as the CPU path. Tests compare the two on fresh
//! random inputs (tests/cuda_ops.rs).

use super::{arg, blocks_for, device};
use crate::tensor::Layout;
use crate::{DType, Error, Result, Tensor};

/// `struct Strides` of kernels/common.cuh.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Strides {
    pub rank: i64,
    pub shape: [i64; 8],
    pub stride: [i64; 8],
}

impl Strides {
    /// Shape and element strides, with size-1 dims dropped and dims that are contiguous with
    /// each other merged (fewer index divisions in the kernel). `strides` may contain zeros
    /// (broadcast). Errors when more than 8 dims remain.
    pub fn new(shape: &[usize], strides: &[usize], op: &'static str) -> Result<Strides> {
        let mut dims: Vec<(usize, usize)> = Vec::new();
        for (&n, &s) in shape.iter().zip(strides) {
            if n == 1 {
                continue;
            }
            if let Some(last) = dims.last_mut() {
                if last.1 == s * n {
                    *last = (last.0 * n, s);
                    continue;
                }
            }
            dims.push((n, s));
        }
        if dims.len() > 8 {
            return Err(Error::shape(
                op,
                format!("cuda supports views of rank <= 8, got {shape:?} / {strides:?}"),
            ));
        }
        let mut out = Strides {
            rank: dims.len() as i64,
            ..Default::default()
        };
        for (i, (n, s)) in dims.into_iter().enumerate() {
            out.shape[i] = n as i64;
            out.stride[i] = s as i64;
        }
        Ok(out)
    }

    pub fn of(layout: &Layout, op: &'static str) -> Result<Strides> {
        Self::new(&layout.shape, &layout.strides, op)
    }
}

/// Threads per block for the grid-stride elementwise kernels.
pub const THREADS: usize = 256;

/// Grid size for a grid-stride loop over `n` items: enough blocks to fill the device a few
/// times over, no more.
pub fn grid_for(n: usize) -> u32 {
    let cap = device()
        .map(|d| d.sm_count as u32 * 16)
        .unwrap_or(2048)
        .max(1);
    blocks_for(n, THREADS).clamp(1, cap)
}

/// Row chunks of a two-pass column sum (linear's bias gradient, rmsnorm's weight gradient)
/// over `rows` rows: up to 256 chunks of at least 16 rows (256 blocks for the 3B model's
/// 4096 rows, where 64 chunks left half the SMs idle). They depend on the rows alone, so the
/// sums are the same bits on every GPU and on both the 16-byte and the scalar path. Returns
/// (rows per chunk, chunks).
pub fn col_chunks(rows: usize) -> (usize, usize) {
    let chunks = (rows / 16).clamp(1, 256);
    let per = rows.div_ceil(chunks).max(1);
    (per, rows.div_ceil(per))
}

/// The second pass of a two-pass column sum: `out[j] = Σ_c partial[c, j]` by the
/// `col_partials_sum` kernel `kernel` of `module` (grid ceil(d / 32), block (32, 8)).
pub fn col_partials_sum(
    module: &'static str,
    kernel: &str,
    partial: u64,
    out: u64,
    chunks: usize,
    d: usize,
) -> Result<()> {
    let (c64, d64) = (chunks as i64, d as i64);
    device()?.launch(
        module,
        kernel,
        (d.div_ceil(32) as u32, 1, 1),
        (32, 8, 1),
        0,
        &[arg(&partial), arg(&out), arg(&c64), arg(&d64)],
    )
}

/// A device tensor of `shape` filled with `v`.
pub fn fill(shape: &[usize], v: f64, dtype: DType) -> Result<Tensor> {
    let t = Tensor::empty_cuda(shape, dtype)?;
    let n = t.numel();
    if n == 0 {
        return Ok(t);
    }
    let sfx = super::kernels::suffix(dtype, "fill")?;
    let (p, val, n64) = (t.cuda_ptr()?, v as f32, n as i64);
    device()?.launch(
        "copy.cu",
        &format!("fill_{sfx}"),
        (grid_for(n), 1, 1),
        (THREADS as u32, 1, 1),
        0,
        &[arg(&p), arg(&val), arg(&n64)],
    )?;
    Ok(t)
}

/// A contiguous copy of a (non-contiguous) device view. No autograd (the caller records).
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    let out = Tensor::empty_cuda(x.shape(), x.dtype())?;
    let n = x.numel();
    if n == 0 {
        return Ok(out);
    }
    let s = Strides::of(x.layout(), "contiguous")?;
    let esize = x.dtype().size_in_bytes();
    let r = s.rank as usize;
    // Fast path: last dim contiguous, rows a whole number of 16-byte chunks, every row start
    // 16-byte aligned -> one 16-byte load and store per thread.
    if r >= 1 && s.stride[r - 1] == 1 {
        let inner = s.shape[r - 1] as usize;
        let src = x.cuda_ptr()?;
        let aligned = (inner * esize).is_multiple_of(16)
            && src.is_multiple_of(16)
            && s.stride[..r - 1]
                .iter()
                .all(|&st| (st as usize * esize).is_multiple_of(16));
        if aligned {
            let mut outer = Strides {
                rank: (r - 1) as i64,
                ..Default::default()
            };
            outer.shape[..r - 1].copy_from_slice(&s.shape[..r - 1]);
            outer.stride[..r - 1].copy_from_slice(&s.stride[..r - 1]);
            let row_vecs = (inner * esize / 16) as i64;
            let n_vecs = (n * esize / 16) as i64;
            let (dst, es) = (out.cuda_ptr()?, esize as i64);
            device()?.launch(
                "copy.cu",
                "strided_copy_rows16",
                (grid_for(n_vecs as usize), 1, 1),
                (THREADS as u32, 1, 1),
                0,
                &[
                    arg(&src),
                    arg(&dst),
                    arg(&outer),
                    arg(&row_vecs),
                    arg(&es),
                    arg(&n_vecs),
                ],
            )?;
            return Ok(out);
        }
    }
    // A transposed matrix (element (r, c) at r + c·ld): tiled transpose through shared memory.
    if r == 2 && s.stride[0] == 1 && (esize == 2 || esize == 4) {
        transpose_into(
            x.cuda_ptr()?,
            out.cuda_ptr()?,
            s.shape[0] as usize,
            s.shape[1] as usize,
            s.stride[1] as usize,
            esize,
        )?;
        return Ok(out);
    }
    let kernel = match x.dtype().size_in_bytes() {
        2 => "strided_copy_2",
        4 => "strided_copy_4",
        8 => "strided_copy_8",
        _ => return Err(Error::dtype("contiguous", x.dtype())),
    };
    let (src, dst, n64) = (x.cuda_ptr()?, out.cuda_ptr()?, n as i64);
    device()?.launch(
        "copy.cu",
        kernel,
        (grid_for(n), 1, 1),
        (THREADS as u32, 1, 1),
        0,
        &[arg(&src), arg(&dst), arg(&s), arg(&n64)],
    )?;
    Ok(out)
}

/// dst [rows, cols] (contiguous) = the matrix whose element (r, c) is at `src + (r + c·ld)`
/// elements of `esize` bytes (2 or 4).
pub fn transpose_into(
    src: u64,
    dst: u64,
    rows: usize,
    cols: usize,
    ld: usize,
    esize: usize,
) -> Result<()> {
    let [r, c, l] = [rows, cols, ld].map(|v| v as i64);
    if esize == 2 {
        // 64 x 64 tiles, two elements per 4-byte access where the layout allows.
        let src_pairs = (ld.is_multiple_of(2) && src.is_multiple_of(4)) as i32;
        let dst_pairs = (cols.is_multiple_of(2) && dst.is_multiple_of(4)) as i32;
        return device()?.launch(
            "copy.cu",
            "transpose_2_x2",
            (cols.div_ceil(64) as u32, rows.div_ceil(64) as u32, 1),
            (32, 8, 1),
            0,
            &[
                arg(&src),
                arg(&dst),
                arg(&r),
                arg(&c),
                arg(&l),
                arg(&src_pairs),
                arg(&dst_pairs),
            ],
        );
    }
    if esize != 4 {
        return Err(Error::msg(format!(
            "internal: transpose of {esize}-byte elements"
        )));
    }
    device()?.launch(
        "copy.cu",
        "transpose_4",
        (cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, 1),
        (32, 8, 1),
        0,
        &[arg(&src), arg(&dst), arg(&r), arg(&c), arg(&l)],
    )
}

/// f32 <-> bf16 cast of a device tensor (contiguous result). No autograd (the caller records).
pub fn cast(x: &Tensor, to: DType) -> Result<Tensor> {
    let x = if x.is_contiguous() {
        x.clone()
    } else {
        contiguous(x)?
    };
    let kernel = match (x.dtype(), to) {
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (a, b) => {
            return Err(Error::msg(format!(
                "to_dtype: cuda casts f32 <-> bf16 only, not {a} -> {b}"
            )));
        }
    };
    let out = Tensor::empty_cuda(x.shape(), to)?;
    let n = x.numel();
    let (mut src, mut dst) = (x.cuda_ptr()?, out.cuda_ptr()?);
    // Chunks of 8 elements with 16-byte accesses, then the tail one element at a time.
    let n8 = if src.is_multiple_of(16) && dst.is_multiple_of(16) {
        n / 8
    } else {
        0
    };
    if n8 > 0 {
        let c = n8 as i64;
        device()?.launch(
            "copy.cu",
            &format!("{kernel}_v8"),
            (grid_for(n8), 1, 1),
            (THREADS as u32, 1, 1),
            0,
            &[arg(&src), arg(&dst), arg(&c)],
        )?;
        src += (8 * n8 * x.dtype().size_in_bytes()) as u64;
        dst += (8 * n8 * to.size_in_bytes()) as u64;
    }
    let rest = n - 8 * n8;
    if rest > 0 {
        let r = rest as i64;
        device()?.launch(
            "copy.cu",
            kernel,
            (grid_for(rest), 1, 1),
            (THREADS as u32, 1, 1),
            0,
            &[arg(&src), arg(&dst), arg(&r)],
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Strides;

    #[test]
    fn strides_merge_and_drop() {
        // contiguous [2,3,4] -> one dim of 24
        let s = Strides::new(&[2, 3, 4], &[12, 4, 1], "t").unwrap();
        assert_eq!((s.rank, s.shape[0], s.stride[0]), (1, 24, 1));
        // transpose [3,2] of [2,3]: strides [1,3] stay two dims
        let s = Strides::new(&[3, 2], &[1, 3], "t").unwrap();
        assert_eq!(s.rank, 2);
        // broadcast dim (stride 0) and size-1 dims
        let s = Strides::new(&[1, 5, 4], &[0, 0, 1], "t").unwrap();
        assert_eq!((s.rank, s.shape[0], s.stride[0], s.shape[1]), (2, 5, 0, 4));
    }

    /// Row chunks cover every row once, none empty, at least 16 rows each unless there are
    /// fewer rows, and at most 256 of them.
    #[test]
    fn col_chunks_cover_the_rows() {
        for rows in [1, 15, 16, 17, 37, 300, 1000, 4096, 100_000, 1 << 22] {
            let (per, chunks) = super::col_chunks(rows);
            assert!(per * chunks >= rows && per * (chunks - 1) < rows, "{rows}");
            assert!(per >= 16.min(rows) && (1..=256).contains(&chunks), "{rows}");
        }
        // The 3B step's 4096 rows: 256 chunks of 16 rows.
        assert_eq!(super::col_chunks(4096), (16, 256));
    }
}
pub mod activation;
pub mod attention;
pub mod elementwise;
pub mod index;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod reduce;
pub mod rope;
