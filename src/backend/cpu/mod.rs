//! CPU kernels on slices: strided gathers, parallel maps, GEMM through the `gemm` crate.

use crate::tensor::Layout;
use rayon::prelude::*;
use std::mem::MaybeUninit;

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

/// Elements per task of the parallel elementwise maps.
const CHUNK: usize = 1 << 14;

/// A vector of `len` elements written in place, piece by piece (`piece` elements each, the
/// last possibly fewer), by `fill(k, piece_k)`, in parallel over the pieces for large `len`:
/// no zero fill first, and a plain loop per piece that vectorises.
///
/// # Safety
/// `fill` must write every element of each piece it is given.
unsafe fn filled<T: Send>(
    len: usize,
    piece: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    if len >= PAR_MIN {
        spare
            .par_chunks_mut(piece)
            .enumerate()
            .for_each(|(k, o)| fill(k, o));
    } else {
        spare
            .chunks_mut(piece)
            .enumerate()
            .for_each(|(k, o)| fill(k, o));
    }
    // SAFETY: every element was written (the caller's contract).
    out.set_len(len);
    out
}

/// `out[i] = f(x[i])`, in parallel for large inputs.
pub fn map<T: Copy + Send + Sync, U: Copy + Send + Sync>(
    x: &[T],
    f: impl Fn(T) -> U + Sync,
) -> Vec<U> {
    // SAFETY: each chunk is zipped with as many inputs, so every element is written.
    unsafe {
        filled(x.len(), CHUNK, |c, o| {
            let x = &x[c * CHUNK..c * CHUNK + o.len()];
            for (o, &v) in o.iter_mut().zip(x) {
                o.write(f(v));
            }
        })
    }
}

/// `out[i] = f(a[i], b[i])`, in parallel for large inputs.
pub fn zip_map<T: Copy + Send + Sync, U: Copy + Send + Sync>(
    a: &[T],
    b: &[T],
    f: impl Fn(T, T) -> U + Sync,
) -> Vec<U> {
    assert_eq!(a.len(), b.len(), "zip_map: inputs of different lengths");
    // SAFETY: each chunk is zipped with as many inputs, so every element is written.
    unsafe {
        filled(a.len(), CHUNK, |c, o| {
            let (start, end) = (c * CHUNK, c * CHUNK + o.len());
            let (a, b) = (&a[start..end], &b[start..end]);
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                o.write(f(x, y));
            }
        })
    }
}

/// `(p[i], q[i]) = f(a[i], b[i], c[i])`: two outputs from three same-length inputs in one pass
/// (a fused backward's two gradients), in parallel for large inputs.
pub fn map3_to2<T: Copy + Send + Sync, U: Copy + Send + Sync>(
    a: &[T],
    b: &[T],
    c: &[T],
    f: impl Fn(T, T, T) -> (U, U) + Sync,
) -> (Vec<U>, Vec<U>) {
    let n = a.len();
    assert!(
        b.len() == n && c.len() == n,
        "map3_to2: inputs of different lengths"
    );
    let (mut p, mut q) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (ps, qs) = (
        &mut p.spare_capacity_mut()[..n],
        &mut q.spare_capacity_mut()[..n],
    );
    let fill = |start: usize, (ps, qs): (&mut [MaybeUninit<U>], &mut [MaybeUninit<U>])| {
        let m = ps.len();
        let (a, b, c) = (
            &a[start..start + m],
            &b[start..start + m],
            &c[start..start + m],
        );
        for (i, (pi, qi)) in ps.iter_mut().zip(qs.iter_mut()).enumerate() {
            let (x, y) = f(a[i], b[i], c[i]);
            pi.write(x);
            qi.write(y);
        }
    };
    if n >= PAR_MIN {
        let chunks = ps.par_chunks_mut(CHUNK).zip(qs.par_chunks_mut(CHUNK));
        chunks.enumerate().for_each(|(k, o)| fill(k * CHUNK, o));
    } else {
        fill(0, (ps, qs));
    }
    // SAFETY: the chunks of p and q have equal lengths and cover them, and `fill` writes
    // every element of both.
    unsafe {
        p.set_len(n);
        q.set_len(n);
    }
    (p, q)
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

    /// Accumulator lanes of the sums (`write_row_sum` sums in the same order).
    pub(super) const L: usize = 8;

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

/// Writes `o[j] = f(a[j])` into the fresh row `o` (`a` as long as `o`, else panics) and
/// returns the row, now initialised: the way a `map_rows` kernel fills its output row.
#[inline]
pub fn write_row<'o, T: Copy>(
    o: &'o mut [MaybeUninit<T>],
    a: &[T],
    f: impl Fn(T) -> T,
) -> &'o mut [T] {
    assert_eq!(
        a.len(),
        o.len(),
        "write_row: input and output rows differ in length"
    );
    for (slot, &x) in o.iter_mut().zip(a) {
        slot.write(f(x));
    }
    // SAFETY: the zip above wrote all o.len() elements (a is as long); MaybeUninit<T> has
    // T's layout.
    unsafe { &mut *(o as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// `write_row` that also returns Σ o[j], summed in `rows::sum`'s order (the same bits), so
/// that a kernel needing the sum of what it wrote (softmax) does not read the row again.
#[inline]
pub fn write_row_sum<'o, T: crate::tensor::Float>(
    o: &'o mut [MaybeUninit<T>],
    a: &[T],
    f: impl Fn(T) -> T,
) -> (&'o mut [T], T) {
    use rows::L;
    assert_eq!(
        a.len(),
        o.len(),
        "write_row_sum: input and output rows differ in length"
    );
    let mut acc = [T::zero(); L];
    let (mut oc, mut ac) = (o.chunks_exact_mut(L), a.chunks_exact(L));
    for (so, sa) in (&mut oc).zip(&mut ac) {
        for i in 0..L {
            let y = f(sa[i]);
            so[i].write(y);
            acc[i] += y;
        }
    }
    let mut rest = T::zero();
    for (slot, &x) in oc.into_remainder().iter_mut().zip(ac.remainder()) {
        let y = f(x);
        slot.write(y);
        rest += y;
    }
    let sum = acc.iter().copied().sum::<T>() + rest;
    // SAFETY: the chunks and the remainder above wrote all o.len() elements (a is as long);
    // MaybeUninit<T> has T's layout.
    (
        unsafe { &mut *(o as *mut [MaybeUninit<T>] as *mut [T]) },
        sum,
    )
}

/// `write_row` with two input rows: `o[j] = f(a[j], b[j])`.
#[inline]
pub fn write_row2<'o, T: Copy>(
    o: &'o mut [MaybeUninit<T>],
    a: &[T],
    b: &[T],
    f: impl Fn(T, T) -> T,
) -> &'o mut [T] {
    let n = o.len();
    assert!(
        a.len() == n && b.len() == n,
        "write_row2: rows differ in length"
    );
    for ((slot, &x), &y) in o.iter_mut().zip(a).zip(b) {
        slot.write(f(x, y));
    }
    // SAFETY: as in `write_row`.
    unsafe { &mut *(o as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// `write_row` with three input rows: `o[j] = f(a[j], b[j], c[j])`.
#[inline]
pub fn write_row3<'o, T: Copy>(
    o: &'o mut [MaybeUninit<T>],
    (a, b, c): (&[T], &[T], &[T]),
    f: impl Fn(T, T, T) -> T,
) -> &'o mut [T] {
    let n = o.len();
    assert!(
        a.len() == n && b.len() == n && c.len() == n,
        "write_row3: rows differ in length"
    );
    for (((slot, &x), &y), &z) in o.iter_mut().zip(a).zip(b).zip(c) {
        slot.write(f(x, y, z));
    }
    // SAFETY: as in `write_row`.
    unsafe { &mut *(o as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// The output row that a `map_rows` kernel returned must be the one it was given, written
/// (`write_row` is the safe way to get one).
fn check_row<T>(done: &[T], given: *const MaybeUninit<T>, n: usize) {
    assert!(
        std::ptr::eq(done.as_ptr().cast(), given) && done.len() == n,
        "map_rows: the kernel must return its own output row, written"
    );
}

/// Rows of `n` elements must cover `len` exactly.
fn whole_rows(len: usize, n: usize) {
    assert!(
        len.is_multiple_of(n),
        "map_rows: {len} elements are not rows of {n}"
    );
}

/// Kernel of `map_rows`: row index, input row, fresh output row; returns the output row
/// written (`write_row`).
pub trait RowKernel<T>:
    for<'o> Fn(usize, &[T], &'o mut [MaybeUninit<T>]) -> &'o mut [T] + Sync + Send
{
}
impl<T, F> RowKernel<T> for F where
    F: for<'o> Fn(usize, &[T], &'o mut [MaybeUninit<T>]) -> &'o mut [T] + Sync + Send
{
}

/// Kernel of `map_rows2`: like `RowKernel` with two input rows.
pub trait RowKernel2<T>:
    for<'o> Fn(usize, &[T], &[T], &'o mut [MaybeUninit<T>]) -> &'o mut [T] + Sync + Send
{
}
impl<T, F> RowKernel2<T> for F where
    F: for<'o> Fn(usize, &[T], &[T], &'o mut [MaybeUninit<T>]) -> &'o mut [T] + Sync + Send
{
}

/// `out` rows of length `n` computed from the matching rows of `x` (parallel over rows),
/// written in place without a zero fill first.
pub fn map_rows<T: Copy + Send + Sync>(x: &[T], n: usize, f: impl RowKernel<T>) -> Vec<T> {
    if n == 0 {
        return Vec::new();
    }
    whole_rows(x.len(), n);
    let row = |i: usize, r: &[T], o: &mut [MaybeUninit<T>]| {
        let given = o.as_ptr();
        check_row(f(i, r, o), given, n);
    };
    // SAFETY: `check_row` proves each row was written (through `write_row`), and the rows
    // cover the output.
    unsafe { filled(x.len(), n, |i, o| row(i, &x[i * n..(i + 1) * n], o)) }
}

/// Like `map_rows` with two same-shape inputs.
pub fn map_rows2<T: Copy + Send + Sync>(
    x: &[T],
    y: &[T],
    n: usize,
    f: impl RowKernel2<T>,
) -> Vec<T> {
    assert_eq!(x.len(), y.len(), "map_rows2: inputs of different lengths");
    if n == 0 {
        return Vec::new();
    }
    whole_rows(x.len(), n);
    let row = |i: usize, o: &mut [MaybeUninit<T>]| {
        let given = o.as_ptr();
        let (a, b) = (&x[i * n..(i + 1) * n], &y[i * n..(i + 1) * n]);
        check_row(f(i, a, b, o), given, n);
    };
    // SAFETY: as in `map_rows`.
    unsafe { filled(x.len(), n, row) }
}

/// Keeps freed heap memory in the process instead of returning it to the kernel.
///
/// A training step allocates and frees the same few hundred tensors every step. With glibc's
/// defaults, blocks above the (adaptive) mmap threshold are mapped and unmapped each time
/// and the heap top is trimmed on free, so every step page-faults its activations back in:
/// on the tiny preset that was 17% of all CPU samples (`perf`), a fifth of it in the kernel.
/// So: no block is mmap'd (glibc's threshold cannot go above 32 MiB, and a [4096, 2816] f32
/// activation is 46 MiB: its faults made swiglu's forward + backward 62 ms instead of 13),
/// the heap is never trimmed, and every thread allocates from the one main heap (the CLI runs
/// its work on rayon workers, whose own arenas would otherwise map and unmap). Freed blocks
/// are then reused, not faulted in again; the peak resident memory of `bench ops` went down
/// (321 -> 292 MB). The price: memory is not returned to the system after a peak (a
/// checkpoint load, a long sequence) until the process ends; `TESSERA_KEEP_FREED_MEMORY=0`
/// keeps glibc's defaults. Called once by the CLI; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var("TESSERA_KEEP_FREED_MEMORY").is_ok_and(|v| v == "0") {
            return;
        }
        // glibc <malloc.h>
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_MMAP_MAX: i32 = -4;
        const M_ARENA_MAX: i32 = -8;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes allocator parameters; it is called before other
        // threads allocate (first thing in `cli::run`), and a rejected value is ignored.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_ARENA_MAX, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / 4e9 - 0.5)
            .collect()
    }

    /// The in-place maps give what a serial loop gives, below and above the parallel
    /// threshold and across chunk boundaries (odd lengths).
    #[test]
    fn maps_write_every_element() {
        for n in [0, 1, 7, PAR_MIN - 1, PAR_MIN, 3 * CHUNK + 5, 100_003] {
            let (a, b, c) = (data(n, 1), data(n, 2), data(n, 3));
            let f = |x: f32| x * 3.0 - 1.0;
            assert_eq!(map(&a, f), a.iter().map(|&x| f(x)).collect::<Vec<_>>());
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y + 1.0).collect();
            assert_eq!(zip_map(&a, &b, |x, y| x * y + 1.0), want);
            let (p, q) = map3_to2(&a, &b, &c, |x, y, z| (x + y * z, x - z));
            assert_eq!(p, (0..n).map(|i| a[i] + b[i] * c[i]).collect::<Vec<_>>());
            assert_eq!(q, (0..n).map(|i| a[i] - c[i]).collect::<Vec<_>>());
        }
    }

    #[test]
    fn row_maps_write_every_row() {
        for (rows, n) in [(1, 1), (3, 5), (37, 1000), (33, 1024)] {
            let (x, y) = (data(rows * n, 4), data(rows * n, 5));
            let got = map_rows(&x, n, |i, r, o| {
                let o = write_row(o, r, |v| v + i as f32);
                o[0] = -1.0;
                o
            });
            for i in 0..rows {
                assert_eq!(got[i * n], -1.0);
                for j in 1..n {
                    assert_eq!(got[i * n + j], x[i * n + j] + i as f32);
                }
            }
            let got = map_rows2(&x, &y, n, |_, a, b, o| write_row2(o, a, b, |u, v| u - v));
            let want: Vec<f32> = x.iter().zip(&y).map(|(u, v)| u - v).collect();
            assert_eq!(got, want);
            let got = map_rows2(&x, &y, n, |_, a, b, o| {
                write_row3(o, (a, b, a), |u, v, w| u * v + w)
            });
            let want: Vec<f32> = x.iter().zip(&y).map(|(u, v)| u * v + u).collect();
            assert_eq!(got, want);
        }
        assert!(map_rows(&[] as &[f32], 4, |_, r, o| write_row(o, r, |v| v)).is_empty());
    }

    /// A kernel must hand back the row it was given: any other row is refused (the output
    /// would otherwise hold unwritten memory).
    #[test]
    #[should_panic(expected = "must return its own output row")]
    fn row_maps_refuse_a_foreign_row() {
        map_rows(&[1.0f32, 2.0], 2, |_, _, _| {
            Box::leak(vec![0.0f32; 2].into_boxed_slice())
        });
    }

    #[test]
    #[should_panic(expected = "differ in length")]
    fn write_row_refuses_a_short_input() {
        map_rows(&[1.0f32, 2.0], 2, |_, r, o| write_row(o, &r[..1], |v| v));
    }
}
