//! CPU kernels on slices: strided gathers, parallel maps, GEMM through the `gemm` crate.

use crate::tensor::Layout;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod gemm_f32;

/// Below this many elements, kernels stay on the calling thread.
pub const PAR_MIN: usize = 1 << 15;

/// Copies the elements of a strided view into a new contiguous vector.
pub fn gather_strided<T: Copy>(all: &[T], layout: &Layout) -> Vec<T> {
    let mut out = Vec::with_capacity(layout.numel());
    layout.for_each_row(|start, stride, len| {
        if stride == 1 {
            out.extend_from_slice(&all[start..start + len]);
        } else {
            out.extend((0..len).map(|j| all[start + j * stride]));
        }
    });
    out
}

/// `out[i] = f(x[i])`, in parallel for large inputs.
pub fn map<T: Copy + Send + Sync, U: Copy + Send + Sync>(
    x: &[T],
    f: impl Fn(T) -> U + Sync,
) -> Vec<U> {
    if x.len() >= PAR_MIN {
        x.par_iter().map(|&v| f(v)).collect()
    } else {
        x.iter().map(|&v| f(v)).collect()
    }
}

/// `out[i] = f(a[i], b[i])`, in parallel for large inputs.
pub fn zip_map<T: Copy + Send + Sync, U: Copy + Send + Sync>(
    a: &[T],
    b: &[T],
    f: impl Fn(T, T) -> U + Sync,
) -> Vec<U> {
    debug_assert_eq!(a.len(), b.len());
    if a.len() >= PAR_MIN {
        a.par_iter()
            .zip(b.par_iter())
            .map(|(&x, &y)| f(x, y))
            .collect()
    } else {
        a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
    }
}

/// Applies `f` to consecutive rows of length `n` of `data` (parallel over rows).
pub fn for_rows_mut<T: Send>(data: &mut [T], n: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if n == 0 {
        return;
    }
    if data.len() >= PAR_MIN {
        data.par_chunks_mut(n)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        data.chunks_mut(n).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Number of threads rayon runs on.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// A strided matrix operand: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub struct MatRef<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

/// `dst[m,n] (+)= lhs[m,k] @ rhs[k,n]`; `dst` row-major contiguous with row stride `n`.
///
/// # Safety
/// `lhs`, `rhs` must address valid m×k and k×n matrices with their strides; `dst` must hold
/// m×n elements.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<T: 'static + num_traits::Zero + num_traits::One + Copy>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    accumulate: bool,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    parallel: bool,
) {
    // f32 on AVX2 + FMA: our packed kernel (src/backend/cpu/gemm_f32.rs), except for tiny
    // or skinny products, where the gemm crate's small-matrix paths are faster.
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && m * n * k >= 32 * 32 * 32
        && m >= 8
        && n >= 48
        && gemm_f32::available()
    {
        gemm_f32::gemm(
            m,
            n,
            k,
            dst as *mut f32,
            accumulate,
            lhs.ptr as *const f32,
            lhs.rs,
            lhs.cs,
            rhs.ptr as *const f32,
            rhs.rs,
            rhs.cs,
            parallel,
        );
        return;
    }
    let par = if parallel && threads() > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        T::one(),
        T::one(),
        false,
        false,
        false,
        par,
    );
}

/// A raw pointer that kernels share across rayon workers that write disjoint elements.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(*mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    pub fn new(p: *mut T) -> Self {
        SyncPtr(p)
    }
    #[inline]
    pub fn get(&self) -> *mut T {
        self.0
    }
}

/// Row helpers written with 8 independent accumulators so LLVM vectorises them (a plain
/// float fold is sequential: IEEE addition is not reassociated).
pub mod rows {
    use crate::tensor::Float;

    const L: usize = 8;

    #[inline]
    pub fn max<T: Float>(row: &[T]) -> T {
        let mut acc = [T::neg_infinity(); L];
        let chunks = row.chunks_exact(L);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..L {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let mut m = rest
            .iter()
            .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
        for a in acc {
            m = if a > m { a } else { m };
        }
        m
    }

    #[inline]
    pub fn sum<T: Float>(row: &[T]) -> T {
        let mut acc = [T::zero(); L];
        let chunks = row.chunks_exact(L);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..L {
                acc[i] += c[i];
            }
        }
        acc.iter().copied().sum::<T>() + rest.iter().copied().sum::<T>()
    }

    #[inline]
    pub fn dot<T: Float>(a: &[T], b: &[T]) -> T {
        let mut acc = [T::zero(); L];
        let n = a.len().min(b.len());
        let full = n / L * L;
        for (ca, cb) in a[..full].chunks_exact(L).zip(b[..full].chunks_exact(L)) {
            for i in 0..L {
                acc[i] += ca[i] * cb[i];
            }
        }
        let tail: T = (full..n).map(|i| a[i] * b[i]).sum();
        acc.iter().copied().sum::<T>() + tail
    }

    /// Σ exp(x − m).
    #[inline]
    pub fn sum_exp<T: Float>(row: &[T], m: T) -> T {
        let mut acc = [T::zero(); L];
        let chunks = row.chunks_exact(L);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..L {
                acc[i] += (c[i] - m).exp_fast();
            }
        }
        acc.iter().copied().sum::<T>() + rest.iter().map(|&v| (v - m).exp_fast()).sum::<T>()
    }

    /// log Σ exp(x), stable; −inf for an empty or all −inf row.
    #[inline]
    pub fn logsumexp<T: Float>(row: &[T]) -> T {
        let m = max(row);
        if m == T::neg_infinity() {
            return m;
        }
        m + sum_exp(row, m).ln()
    }
}

/// `out` rows of length `n` computed from the matching rows of `x` (parallel over rows).
pub fn map_rows<T: Copy + Send + Sync + Default>(
    x: &[T],
    n: usize,
    f: impl Fn(usize, &[T], &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut out = vec![T::default(); x.len()];
    if n == 0 {
        return out;
    }
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .enumerate()
            .for_each(|(i, (o, r))| f(i, r, o));
    } else {
        out.chunks_mut(n)
            .zip(x.chunks(n))
            .enumerate()
            .for_each(|(i, (o, r))| f(i, r, o));
    }
    out
}

/// Like `map_rows` with two same-shape inputs.
pub fn map_rows2<T: Copy + Send + Sync + Default>(
    x: &[T],
    y: &[T],
    n: usize,
    f: impl Fn(usize, &[T], &[T], &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut out = vec![T::default(); x.len()];
    if n == 0 {
        return out;
    }
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(y.par_chunks(n)))
            .enumerate()
            .for_each(|(i, (o, (a, b)))| f(i, a, b, o));
    } else {
        out.chunks_mut(n)
            .zip(x.chunks(n).zip(y.chunks(n)))
            .enumerate()
            .for_each(|(i, (o, (a, b)))| f(i, a, b, o));
    }
    out
}

/// Keeps freed heap memory in the process instead of returning it to the kernel.
///
/// A training step allocates and frees the same few hundred tensors every step. With glibc's
/// defaults, blocks above the (adaptive) mmap threshold are mapped and unmapped each time
/// and the heap top is trimmed on free, so every step page-faults its activations back in:
/// on the tiny preset that was 17% of all CPU samples (`perf`), a fifth of it in the kernel.
/// Raising the mmap threshold to glibc's maximum (32 MiB) and never trimming makes the
/// allocator reuse those pages. Called once by the CLI; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc <malloc.h>
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes allocator parameters; it is called before other
        // threads allocate (first thing in `cli::run`), and a rejected value is ignored.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
