//! Packed, register-blocked f32 GEMM for x86-64 with AVX2 + FMA (BLIS-style).
//!
//! `C[m,n] (+)= A[m,k] @ B[k,n]` with A and B at arbitrary strides and C row-major
//! (row stride n); `cpu::gemm` routes f32 products here when the CPU has AVX2 + FMA.
//!
//! # Blocking
//!
//! ```text
//! for jc in (0..n).step_by(nc)            B panel kp x nc (kp = k unless k is huge),
//!   for kp0 in (0..k).step_by(kp)         packed once, shared by all threads (L3, <= 16 MiB)
//!     pack B[kp0.., jc..]: per KC block, NR-wide slivers, k-major, zero-padded
//!     -- barrier --
//!     tasks (row block x column chunk of the panel), scheduled dynamically:
//!       for ic in rows.step_by(MC)
//!         for pc in (kp0..kp0 + kp).step_by(KC)
//!           pack A[ic.., pc..] (MC x KC, 144 KiB, L2): MR-tall slivers, k-major, zero-padded
//!           for jr in cols.step_by(NR)    B sliver KC x NR = 16 KiB, stays in L1
//!             for ir in (0..mc).step_by(MR)   A sliver KC x MR = 6 KiB, streamed from L2
//!               C[ir.., jr..] (+)= A sliver @ B sliver        (6 x 16 microkernel)
//! ```
//!
//! MR = 6, NR = 16, KC = 256, MC = 144, nc <= max(512, 4 Mi floats / k). The first k
//! block stores into C (or adds to it when `accumulate`), later ones add. Edge tiles run
//! the same microkernel on zero-padded slivers and write back only the valid part. Each
//! task runs its whole k loop, so the only barrier is after packing each B panel, and
//! a thread slowed down by a noisy neighbour just takes fewer tasks. Packing from
//! row-major A or column-major B (the transposing cases) uses 8 x 8 register
//! transposes; far-apart rows are prefetched in software, and so is the next B sliver
//! (into L2) while the microkernels run on the current one.
//!
//! # Napkin math
//!
//! One k step of the 6 x 16 microkernel is 12 FMAs on ymm registers (192 flops) fed by
//! 2 aligned loads of B and 6 broadcasts of A; 12 accumulators + 2 B vectors + 1 broadcast
//! = 15 of the 16 ymm registers. A Zen 3 (or Haswell-class) core retires 2 FMAs per cycle
//! = 32 flop/cycle, so a k step costs 6 cycles, during which the 8 loads stay under the
//! 2-3 load ports, and covering the 4-cycle FMA latency on 2 pipes needs 8 independent
//! accumulators (we have 12). Floor: 32 flop/cycle/core, ~96 GFLOP/s per core at 3 GHz;
//! the microkernel measures ~90% of that on L1-resident data. Per tile and k step it
//! reads 22 floats (88 B) from L1/L2 for 192 flops. Packing costs one pass over A per
//! B panel (1 float per 2*nc flops) and one pass over B in all (1 float per 2*m flops).

use std::arch::x86_64::*;
use std::cell::Cell;
use std::thread::LocalKey;

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile (two ymm vectors).
const NR: usize = 16;
/// Depth of a packed block: a KC x NR B sliver (16 KiB) stays in L1.
const KC: usize = 256;
/// Rows of a packed A block: MC x KC (144 KiB) stays in L2.
const MC: usize = 144;
/// Most floats in a packed B panel (kp x nc: 16 MiB, in L3).
const B_PANEL: usize = 1 << 22;
/// Narrowest B panel when k is large.
const NC_MIN: usize = 512;

/// Whether the running CPU has the features this kernel needs.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Software prefetch distance, in rows, when packing reads rows that are far apart.
const PF_ROWS: usize = 16;

/// Multiply-adds per thread below which fewer threads are used.
const PAR_WORK: usize = 1 << 18;

/// Dynamic scheduling: aim for this many tasks per thread in each B panel.
const TASKS_PER_THREAD: usize = 8;

thread_local! {
    static A_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static B_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// A per-thread packing buffer, taken out of its thread-local slot (so re-entrant calls
/// on the same thread get their own) and put back on drop.
struct Scratch {
    v: Vec<f32>,
    key: &'static LocalKey<Cell<Vec<f32>>>,
}

impl Scratch {
    fn take(key: &'static LocalKey<Cell<Vec<f32>>>, len: usize) -> Scratch {
        let mut v = key.try_with(|c| c.take()).unwrap_or_default();
        if v.len() < len + 32 {
            v = vec![0.0; len + 32];
        }
        Scratch { v, key }
    }

    /// Start of the buffer, 64-byte aligned, with at least `len + 16` floats behind it.
    fn ptr(&mut self) -> *mut f32 {
        let p = self.v.as_mut_ptr();
        let off = p.align_offset(64);
        debug_assert!(off < 16);
        // SAFETY: `v` has 32 spare floats, more than the alignment offset.
        unsafe { p.add(off) }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        let _ = self.key.try_with(|c| c.set(v));
    }
}

/// A read-only strided operand: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl Mat {
    /// The view starting at element (i, j).
    unsafe fn at(self, i: usize, j: usize) -> Mat {
        Mat {
            ptr: self.ptr.offset(i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }
}

/// The destination or a packed buffer, shared by the tasks of one product.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);

impl Ptr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: tasks running on rayon workers write disjoint parts of what these point to
// (tiles of C, slivers of packed B), or only read it, and the driver outlives them.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// `dst[m,n] (+)= A[m,k] @ B[k,n]`: A element (i, p) at `a + i*ars + p*acs`, B element
/// (p, j) at `b + p*brs + j*bcs`, `dst` row-major with row stride `n`.
///
/// # Safety
/// The CPU must support AVX2 and FMA ([`available`]); `a`, `b` must address valid m×k and
/// k×n matrices with their strides; `dst` must hold m×n elements and not overlap them.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    accumulate: bool,
    a: *const f32,
    ars: isize,
    acs: isize,
    b: *const f32,
    brs: isize,
    bcs: isize,
    parallel: bool,
) {
    gemm_with_panel(
        m, n, k, dst, accumulate, a, ars, acs, b, brs, bcs, parallel, B_PANEL,
    );
}

/// [`gemm`] with B panels of at most `panel` floats (tests use small ones).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_with_panel(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    accumulate: bool,
    a: *const f32,
    ars: isize,
    acs: isize,
    b: *const f32,
    brs: isize,
    bcs: isize,
    parallel: bool,
    panel: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            std::ptr::write_bytes(dst, 0, m * n);
        }
        return;
    }
    let a = Mat {
        ptr: a,
        rs: ars,
        cs: acs,
    };
    let b = Mat {
        ptr: b,
        rs: brs,
        cs: bcs,
    };
    let nt = if parallel {
        rayon::current_num_threads()
            .min(m * n * k / PAR_WORK)
            .max(1)
    } else {
        1
    };
    let d = Ptr(dst);
    if nt <= 1 {
        driver(m, n, k, d, accumulate, a, b, 1, panel);
    } else {
        // Run the driver on a pool thread so that its parallel loops fork cheaply.
        rayon::scope(move |_| {
            let d = d;
            driver(m, n, k, d, accumulate, a, b, nt, panel)
        });
    }
}

/// How one panel (`nc` columns) is cut into tasks: `rb` row blocks of whole MR slivers
/// times `cb` column chunks of whole NR slivers. One thread: row blocks of MC. Several:
/// about TASKS_PER_THREAD tasks per thread, from smaller row blocks first (down to 4
/// slivers), then, with fewer than two row blocks a thread, column chunks (down to 4
/// slivers; each chunk packs its own A), and a task count that is a multiple of the thread
/// count when there are few. The plan only partitions C: every element sums the same
/// products in the same order whatever it is.
fn plan(m: usize, nc: usize, nt: usize) -> (usize, usize) {
    let (sm, sn) = (m.div_ceil(MR), nc.div_ceil(NR));
    let rb0 = m.div_ceil(MC);
    let want = TASKS_PER_THREAD * nt;
    if nt <= 1 || rb0 >= want {
        return (rb0, 1);
    }
    let mut rb = want.min(sm.div_ceil(4)).max(rb0);
    if rb < want && rb > nt {
        rb = (rb / nt * nt).max(rb0);
    }
    if rb >= 2 * nt {
        // Two row blocks a thread or more balance well enough; splitting the columns too
        // would pack each block's A once per column chunk (3-7% slower at the tiny
        // preset's weight-gradient shapes, e.g. 352 x 924 x 128 with A column-major).
        return (rb, 1);
    }
    let cmax = sn.div_ceil(4);
    let mut cb = want.div_ceil(rb).min(cmax).max(1);
    if (rb * cb) % nt != 0 {
        if let Some(c) = (cb..=cmax).find(|c| (rb * c) % nt == 0) {
            cb = c;
        }
    }
    (rb, cb)
}

/// Runs `f(0..count)`, over the rayon pool when `nt > 1`.
fn for_tasks(count: usize, nt: usize, f: impl Fn(usize) + Sync + Send) {
    if nt > 1 && count > 1 {
        use rayon::prelude::*;
        (0..count).into_par_iter().for_each(f);
    } else {
        (0..count).for_each(f);
    }
}

/// The loop nest of the module docs, on `nt` threads.
#[allow(clippy::too_many_arguments)]
unsafe fn driver(
    m: usize,
    n: usize,
    k: usize,
    dst: Ptr,
    accumulate: bool,
    a: Mat,
    b: Mat,
    nt: usize,
    panel: usize,
) {
    // Panel width: a k-deep panel within `panel` floats (at least NC_MIN wide), and all
    // panels about equally wide; panel depth: all of k unless that overflows `panel`.
    let ncmax = (panel / k).max(NC_MIN) / NR * NR;
    let ncw = n.div_ceil(n.div_ceil(ncmax)).div_ceil(NR) * NR;
    let kp = k.min((panel / ncw).max(KC) / KC * KC);
    let mut bbuf = Scratch::take(&B_BUF, kp * ncw);
    let pb = Ptr(bbuf.ptr());
    let sm = m.div_ceil(MR);
    for jc in (0..n).step_by(ncw) {
        let nc = ncw.min(n - jc);
        let sn = nc.div_ceil(NR);
        let ncpad = sn * NR;
        let (rb, cb) = plan(m, nc, nt);
        for kp0 in (0..k).step_by(kp) {
            let kd = kp.min(k - kp0);
            // Pack in pieces of at most 16 slivers of one KC block; block q at q*KC*ncpad.
            let per = sn.div_ceil(sn.div_ceil(16));
            let pieces = sn.div_ceil(per);
            for_tasks(kd.div_ceil(KC) * pieces, nt, |t| {
                let (q, r) = (t / pieces, t % pieces);
                let pc = q * KC;
                let kc = KC.min(kd - pc);
                let (s0, s1) = (r * per, ((r + 1) * per).min(sn));
                pack_b(kc, nc, b.at(kp0 + pc, jc), pb.get().add(pc * ncpad), s0, s1);
            });
            for_tasks(rb * cb, nt, |t| {
                let (ti, tj) = (t / cb, t % cb);
                let r0 = (ti * sm / rb * MR).min(m);
                let r1 = ((ti + 1) * sm / rb * MR).min(m);
                let s0 = tj * sn / cb;
                let c0 = s0 * NR;
                let c1 = ((tj + 1) * sn / cb * NR).min(nc);
                if r0 >= r1 || c0 >= c1 {
                    return;
                }
                let mut abuf = Scratch::take(&A_BUF, KC * MC.min(r1 - r0).div_ceil(MR) * MR);
                let pa = abuf.ptr();
                for ic in (r0..r1).step_by(MC) {
                    let mc = MC.min(r1 - ic);
                    for pc in (0..kd).step_by(KC) {
                        let kc = KC.min(kd - pc);
                        pack_a(mc, kc, a.at(ic, kp0 + pc), pa);
                        macro_kernel(
                            mc,
                            c1 - c0,
                            kc,
                            pa,
                            pb.get().add(pc * ncpad + s0 * NR * kc),
                            dst.get().add(ic * n + jc + c0),
                            n,
                            accumulate || kp0 + pc > 0,
                        );
                    }
                }
            });
        }
    }
}

/// All MR x NR tiles of an `mc x nc` block of C from packed A (mc x kc) and B (kc x nc).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn macro_kernel(
    mc: usize,
    nc: usize,
    kc: usize,
    pa: *const f32,
    pb: *const f32,
    c: *mut f32,
    ldc: usize,
    beta: bool,
) {
    let calls = mc.div_ceil(MR);
    for jr in (0..nc).step_by(NR) {
        let nr = NR.min(nc - jr);
        let b = pb.add(jr * kc);
        // The next B sliver (kc cache lines) comes from L3: fetch it into L2, a few lines
        // per microkernel call, while this one runs (worth ~10% on large products).
        let next_b = b.wrapping_add(NR * kc) as *const i8;
        let has_next = jr + NR < nc;
        for (call, ir) in (0..mc).step_by(MR).enumerate() {
            if has_next {
                for l in call * kc / calls..(call + 1) * kc / calls {
                    _mm_prefetch::<_MM_HINT_T1>(next_b.wrapping_add(l * 64));
                }
            }
            let mr = MR.min(mc - ir);
            kernel(
                kc,
                pa.add(ir * kc),
                b,
                c.add(ir * ldc + jr),
                ldc,
                beta,
                mr,
                nr,
            );
        }
    }
}

/// The 6 x 16 microkernel: `C[..mr, ..nr] (+)= A sliver (kc x 6) @ B sliver (kc x 16)`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    beta: bool,
    mr: usize,
    nr: usize,
) {
    // Start pulling the C tile in now; it is needed only after the k loop.
    for i in 0..mr {
        let row = c.add(i * ldc) as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(row);
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(60));
    }
    let z = _mm256_setzero_ps();
    let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
    let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
    let (mut pa, mut pb) = (a, b);
    macro_rules! step {
        () => {{
            let b0 = _mm256_load_ps(pb);
            let b1 = _mm256_load_ps(pb.add(8));
            let x = _mm256_broadcast_ss(&*pa);
            c00 = _mm256_fmadd_ps(x, b0, c00);
            c01 = _mm256_fmadd_ps(x, b1, c01);
            let x = _mm256_broadcast_ss(&*pa.add(1));
            c10 = _mm256_fmadd_ps(x, b0, c10);
            c11 = _mm256_fmadd_ps(x, b1, c11);
            let x = _mm256_broadcast_ss(&*pa.add(2));
            c20 = _mm256_fmadd_ps(x, b0, c20);
            c21 = _mm256_fmadd_ps(x, b1, c21);
            let x = _mm256_broadcast_ss(&*pa.add(3));
            c30 = _mm256_fmadd_ps(x, b0, c30);
            c31 = _mm256_fmadd_ps(x, b1, c31);
            let x = _mm256_broadcast_ss(&*pa.add(4));
            c40 = _mm256_fmadd_ps(x, b0, c40);
            c41 = _mm256_fmadd_ps(x, b1, c41);
            let x = _mm256_broadcast_ss(&*pa.add(5));
            c50 = _mm256_fmadd_ps(x, b0, c50);
            c51 = _mm256_fmadd_ps(x, b1, c51);
            pa = pa.add(MR);
            pb = pb.add(NR);
        }};
    }
    let mut p = kc;
    while p >= 4 {
        step!();
        step!();
        step!();
        step!();
        p -= 4;
    }
    while p > 0 {
        step!();
        p -= 1;
    }
    let acc = [c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51];
    if mr == MR && nr == NR {
        for i in 0..MR {
            let row = c.add(i * ldc);
            let (mut v0, mut v1) = (acc[2 * i], acc[2 * i + 1]);
            if beta {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
            }
            _mm256_storeu_ps(row, v0);
            _mm256_storeu_ps(row.add(8), v1);
        }
    } else {
        let mut tile = [0.0f32; MR * NR];
        for (i, v) in acc.iter().enumerate() {
            _mm256_storeu_ps(tile.as_mut_ptr().add(i * 8), *v);
        }
        for i in 0..mr {
            let row = c.add(i * ldc);
            for j in 0..nr {
                let v = tile[i * NR + j];
                *row.add(j) = if beta { *row.add(j) + v } else { v };
            }
        }
    }
}

/// Transposes the 8 x 8 block whose row r is `r[r]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Packs slivers `s0..s1` of the `kc x nc` block of B into `out`: sliver s holds columns
/// `s*NR..` as kc rows of NR floats (zero past `nc`).
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_b(kc: usize, nc: usize, b: Mat, out: *mut f32, s0: usize, s1: usize) {
    if b.cs == 1 {
        // Rows contiguous: a few slivers at a time, row by row, so each source row is read
        // as one run.
        const GROUP: usize = 4;
        let mut s = s0;
        while s < s1 {
            let g = GROUP.min(s1 - s);
            let full = (s + g) * NR <= nc;
            for p in 0..kc {
                let r = b.ptr.offset(p as isize * b.rs);
                // Rows are far apart: fetch the same columns PF_ROWS rows ahead.
                let ahead = r.wrapping_offset(PF_ROWS as isize * b.rs + (s * NR) as isize);
                for l in (0..g * NR).step_by(16) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
                }
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(g * NR - 1) as *const i8);
                for q in s..s + g {
                    let j0 = q * NR;
                    let d = out.add(q * NR * kc + p * NR);
                    if full {
                        _mm256_store_ps(d, _mm256_loadu_ps(r.add(j0)));
                        _mm256_store_ps(d.add(8), _mm256_loadu_ps(r.add(j0 + 8)));
                    } else {
                        let w = NR.min(nc - j0);
                        for j in 0..NR {
                            *d.add(j) = if j < w { *r.add(j0 + j) } else { 0.0 };
                        }
                    }
                }
            }
            s += g;
        }
        return;
    }
    for s in s0..s1 {
        let j0 = s * NR;
        let w = NR.min(nc - j0);
        let dst = out.add(s * NR * kc);
        let src = b.at(0, j0);
        let mut p0 = 0;
        if b.rs == 1 && w == NR {
            // Columns contiguous: 8 x 8 transposes.
            while p0 + 8 <= kc {
                if p0 % 16 == 0 {
                    for j in 0..NR {
                        let col = src.ptr.wrapping_offset(j as isize * b.cs);
                        _mm_prefetch::<_MM_HINT_T0>(col.wrapping_add(p0 + 64) as *const i8);
                    }
                }
                for h in 0..2 {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (j, v) in r.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(src.ptr.offset((h * 8 + j) as isize * b.cs).add(p0));
                    }
                    let t = transpose8(r);
                    for (p, v) in t.iter().enumerate() {
                        _mm256_store_ps(dst.add((p0 + p) * NR + h * 8), *v);
                    }
                }
                p0 += 8;
            }
        }
        for p in p0..kc {
            for j in 0..NR {
                *dst.add(p * NR + j) = if j < w {
                    *src.ptr.offset(p as isize * b.rs + j as isize * b.cs)
                } else {
                    0.0
                };
            }
        }
    }
}

/// Packs the `mc x kc` block of A into MR-row slivers: sliver s holds rows `s*MR..` as kc
/// columns of MR floats (zero past `mc`). Writes up to 2 floats past the last sliver.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a(mc: usize, kc: usize, a: Mat, out: *mut f32) {
    let full = mc / MR;
    if a.rs == 1 {
        // Columns contiguous: one pass down each column, MR floats to each sliver.
        for p in 0..kc {
            let col = a.ptr.offset(p as isize * a.cs);
            let ahead = col.wrapping_offset(PF_ROWS as isize * a.cs);
            for l in (0..mc).step_by(16) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
            }
            for s in 0..full {
                std::ptr::copy_nonoverlapping(col.add(s * MR), out.add(s * MR * kc + p * MR), MR);
            }
        }
    }
    for s in 0..mc.div_ceil(MR) {
        if a.rs == 1 && s < full {
            continue;
        }
        let i0 = s * MR;
        let h = MR.min(mc - i0);
        let dst = out.add(s * MR * kc);
        let src = a.at(i0, 0);
        let mut p0 = 0;

        if h == MR && a.cs == 1 {
            // Rows contiguous: 8 x 8 transposes of 6 rows (+2 zero rows); each 8-float
            // column store overlaps the next one by 2, so stores go in increasing order.
            let z = _mm256_setzero_ps();
            // The next sliver's rows are far away: fetch them while this one is packed.
            let next = src.ptr.wrapping_offset(MR as isize * a.rs);
            while p0 + 8 <= kc {
                if p0 % 16 == 0 {
                    for i in 0..MR {
                        let row = next.wrapping_offset(i as isize * a.rs);
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(p0) as *const i8);
                    }
                }
                let mut r = [z; 8];
                for (i, v) in r.iter_mut().take(MR).enumerate() {
                    *v = _mm256_loadu_ps(src.ptr.offset(i as isize * a.rs).add(p0));
                }
                let t = transpose8(r);
                for (p, v) in t.iter().enumerate() {
                    _mm256_storeu_ps(dst.add((p0 + p) * MR), *v);
                }
                p0 += 8;
            }
        }
        for p in p0..kc {
            for i in 0..MR {
                *dst.add(p * MR + i) = if i < h {
                    *src.ptr.offset(i as isize * a.rs + p as isize * a.cs)
                } else {
                    0.0
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn fill(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Runs one product with A (m x k) and B (k x n) stored transposed or not, checks it
    /// against an f64 reference (`check_panel` also returns it).
    #[allow(clippy::too_many_arguments)]
    fn check(m: usize, n: usize, k: usize, ta: bool, tb: bool, accumulate: bool, parallel: bool) {
        check_panel(m, n, k, ta, tb, accumulate, parallel, B_PANEL);
    }

    #[allow(clippy::too_many_arguments)]
    fn check_panel(
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
        parallel: bool,
        panel: usize,
    ) -> Vec<f32> {
        let a = fill(m * k, 1 + (m * 31 + k) as u64);
        let b = fill(k * n, 2 + (k * 17 + n) as u64);
        // Element (i, p) of A: row-major at i*k + p, or transposed storage at p*m + i.
        let (ars, acs) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (brs, bcs) = if tb { (1, k as isize) } else { (n as isize, 1) };
        let init = fill(m * n, 3 + (m + n + k) as u64);
        let mut dst = if accumulate {
            init.clone()
        } else {
            vec![f32::NAN; m * n]
        };
        if !accumulate && k > 0 {
            // Garbage that must be overwritten.
            dst.iter_mut().for_each(|v| *v = 1e30);
        }
        unsafe {
            gemm_with_panel(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                accumulate,
                a.as_ptr(),
                ars,
                acs,
                b.as_ptr(),
                brs,
                bcs,
                parallel,
                panel,
            );
        }
        for i in 0..m {
            for j in 0..n {
                let mut want = if accumulate {
                    init[i * n + j] as f64
                } else {
                    0.0
                };
                let mut scale = want.abs();
                for p in 0..k {
                    let x = a[(i as isize * ars + p as isize * acs) as usize] as f64;
                    let y = b[(p as isize * brs + j as isize * bcs) as usize] as f64;
                    want += x * y;
                    scale += (x * y).abs();
                }
                let got = dst[i * n + j] as f64;
                let err = (got - want).abs() / scale.max(1.0);
                assert!(
                    err <= 1e-5,
                    "{m}x{k}x{n} ta={ta} tb={tb} acc={accumulate} par={parallel}: \
                     ({i},{j}) got {got} want {want}"
                );
            }
        }
        dst
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        // (m, k, n)
        (1, 1, 1),
        (7, 13, 5),
        (6, 8, 16),
        (12, 16, 32),
        (37, 29, 41),
        (100, 300, 17),
        (130, 257, 97),
        (5, 600, 3),
        (64, 64, 64),
        (145, 513, 33),
        (200, 40, 300),
        (13, 9, 4100),
    ];

    #[test]
    fn matches_reference_all_layouts() {
        if !available() {
            return;
        }
        for &(m, k, n) in SHAPES {
            for ta in [false, true] {
                for tb in [false, true] {
                    for accumulate in [false, true] {
                        check(m, n, k, ta, tb, accumulate, false);
                    }
                }
            }
        }
    }

    /// On 3 threads, against the reference, and with every element's bits those of the
    /// serial product: the parallel plan only partitions C (row blocks alone at 300 x 200 x
    /// 250, column chunks too at 97 x 1030 x 301 and 20 x 100 x 4200).
    #[test]
    fn matches_reference_parallel() {
        if !available() {
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            for &(m, k, n) in
                SHAPES
                    .iter()
                    .chain(&[(300, 200, 250), (97, 1030, 301), (20, 100, 4200)])
            {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    for accumulate in [false, true] {
                        let parallel = check_panel(m, n, k, ta, tb, accumulate, true, B_PANEL);
                        let serial = check_panel(m, n, k, ta, tb, accumulate, false, B_PANEL);
                        let same = serial
                            .iter()
                            .zip(&parallel)
                            .all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{m}x{k}x{n} ta={ta} tb={tb}: parallel bits differ");
                    }
                }
            }
        });
    }

    #[test]
    fn several_panels_and_k_chunks() {
        if !available() {
            return;
        }
        // Small panels: 3 panels of 368 columns, k in chunks of 256.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            for (ta, tb) in [(false, false), (true, true)] {
                for accumulate in [false, true] {
                    for parallel in [false, true] {
                        check_panel(50, 1100, 700, ta, tb, accumulate, parallel, 4096);
                    }
                }
            }
        });
    }

    #[test]
    fn general_strides() {
        if !available() {
            return;
        }
        // Neither stride 1: A (i, p) at 2*(i*k + p) + 1, B (p, j) at 3*(j*k + p).
        for &(m, k, n) in &[(7, 13, 5), (37, 29, 41), (130, 257, 97)] {
            let a = fill(2 * m * k + 1, 5);
            let b = fill(3 * k * n, 6);
            let (ars, acs, brs, bcs) = (2 * k as isize, 2, 3, 3 * k as isize);
            for parallel in [false, true] {
                let mut dst = vec![0.0f32; m * n];
                unsafe {
                    gemm(
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        false,
                        a.as_ptr().add(1),
                        ars,
                        acs,
                        b.as_ptr(),
                        brs,
                        bcs,
                        parallel,
                    );
                }
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut scale) = (0.0f64, 0.0f64);
                        for p in 0..k {
                            let x = a[1 + (i as isize * ars + p as isize * acs) as usize] as f64;
                            let y = b[(p as isize * brs + j as isize * bcs) as usize] as f64;
                            want += x * y;
                            scale += (x * y).abs();
                        }
                        let got = dst[i * n + j] as f64;
                        assert!(
                            (got - want).abs() / scale.max(1.0) <= 1e-5,
                            "{m}x{k}x{n}: ({i},{j}) got {got} want {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn empty_inner_dimension() {
        if !available() {
            return;
        }
        for accumulate in [false, true] {
            for parallel in [false, true] {
                check(4, 5, 0, false, false, accumulate, parallel);
                check(30, 20, 0, true, true, accumulate, parallel);
            }
        }
        // m or n zero: nothing to do, nothing touched.
        unsafe {
            gemm(
                0,
                3,
                4,
                std::ptr::null_mut(),
                false,
                [1.0f32; 12].as_ptr(),
                4,
                1,
                [1.0f32; 12].as_ptr(),
                3,
                1,
                true,
            );
        }
    }
}
