//! Launcher of the tensor-core GEMMs (kernels/gemm.cu, kernels/gemm_sm90.cu): bf16 operands,
//! f32 accumulation, `C = A · Bᵀ (+ bias) (+ C)` with both operands K-contiguous, or (the
//! warp-specialised Hopper kernel) either operand M/N-contiguous, read as stored.

use super::{arg, device};
use crate::{DType, Error, Result, Tensor};
use cudarc::driver::sys;

const BM: usize = 128;
const BN: usize = 128;
const LDS: usize = 32 + 8;
const STAGES: usize = 3;
const SHARED_BYTES: u32 = (2 * STAGES * BM * LDS * 2) as u32;

/// Whether a [.., M, K] x [N, K] product with these row strides can use the tensor-core path.
pub fn eligible(k: usize, lda: usize, ldb: usize, a_ptr: u64, b_ptr: u64) -> bool {
    k.is_multiple_of(8)
        && lda.is_multiple_of(8)
        && ldb.is_multiple_of(8)
        && a_ptr.is_multiple_of(16)
        && b_ptr.is_multiple_of(16)
        && k > 0
}

/// Which tensor-core kernel runs a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcKernel {
    /// kernels/gemm.cu: mma.sync m16n8k16 (sm_80+), 128x128x32 tiles.
    MmaSync,
    /// kernels/gemm_sm90.cu: wgmma m64n256k16 (sm_90a only), 128x256x64 tiles.
    Wgmma,
    /// kernels/gemm_sm90.cu: warp-specialised persistent wgmma (sm_90a only), operands by TMA,
    /// 128x256x64 tiles (128x128 or 128x64 when there are too few tiles to fill the GPU).
    WgmmaWs,
    /// `WgmmaWs` with the TMA-store epilogue (`_ts` kernels: the tile through shared memory to
    /// the TMA engine instead of 4-byte stores from registers); `WgmmaWs`'s epilogue where it
    /// cannot apply (accumulating into C, C's row stride not a multiple of 8).
    WgmmaWsTma,
}

impl TcKernel {
    /// The default: the warp-specialised wgmma kernel with the TMA-store epilogue on an sm_90
    /// device (0.91-1.13 of cuBLAS at the 3B model's shapes on an H200, run 11 in
    /// docs/gpu-runs.md), mma.sync elsewhere. `TESSERA_GEMM=mma` or `wgmma` picks the others on
    /// sm_90 (benchmarks); `TESSERA_GEMM_TS=0` the register epilogue.
    pub fn default_for_device() -> TcKernel {
        let hopper = device().map(|d| d.cc == (9, 0)).unwrap_or(false);
        if !hopper {
            return TcKernel::MmaSync;
        }
        match gemm_choice() {
            "mma" => TcKernel::MmaSync,
            "wgmma" => TcKernel::Wgmma,
            _ if TMA_STORE.get() != Some(0) => TcKernel::WgmmaWsTma,
            _ => TcKernel::WgmmaWs,
        }
    }

    /// Whether this is the warp-specialised kernel (either epilogue).
    pub fn is_ws(self) -> bool {
        matches!(self, TcKernel::WgmmaWs | TcKernel::WgmmaWsTma)
    }
}

/// The kernels a product may be sent to instead of the default (`TESSERA_GEMM`, `--gemm`):
/// the SIMT kernel, the mma.sync or the plain wgmma tensor-core kernel, or cuBLAS (the
/// benchmark reference, `backend::cuda::cublas`).
pub const GEMM_CHOICES: [&str; 5] = ["default", "simple", "mma", "wgmma", "cublas"];

/// `set_gemm_choice`'s value as an index into `GEMM_CHOICES` (`u8::MAX`: not set).
static GEMM_SET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// The process's GEMM choice: `set_gemm_choice`'s, else `TESSERA_GEMM` (read once; empty when
/// unset or "default"; a value that names no choice, such as the GPU check's "ws", means the
/// default too). Consulted on every product.
pub(crate) fn gemm_choice() -> &'static str {
    static ENV: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    match GEMM_SET.load(std::sync::atomic::Ordering::Relaxed) {
        u8::MAX => ENV.get_or_init(|| match std::env::var("TESSERA_GEMM") {
            Ok(v) if v != "default" => v,
            _ => String::new(),
        }),
        0 => "",
        i => GEMM_CHOICES[i as usize],
    }
}

/// `f` with this process's products sent to `choice` (one of `GEMM_CHOICES`), then the
/// choice as it was.
pub fn with_gemm_choice<T>(choice: &str, f: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    /// Puts the choice back when dropped, a panic in `f` included.
    struct Restore(u8);
    impl Drop for Restore {
        fn drop(&mut self) {
            GEMM_SET.store(self.0, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _restore = Restore(GEMM_SET.load(std::sync::atomic::Ordering::Relaxed));
    set_gemm_choice(Some(choice))?;
    f()
}

/// Sends this process's products to one of `GEMM_CHOICES` (`None`: back to `TESSERA_GEMM`).
/// `cublas` is checked here: an error when libcublas cannot be loaded or set up.
pub fn set_gemm_choice(choice: Option<&str>) -> crate::Result<()> {
    let i = match choice {
        None => u8::MAX,
        Some(c) => {
            let i = GEMM_CHOICES.iter().position(|&g| g == c).ok_or_else(|| {
                crate::Error::msg(format!(
                    "--gemm {c}: unknown (one of {})",
                    GEMM_CHOICES.join(", ")
                ))
            })?;
            if c == "cublas" {
                super::cublas::handle()?;
            }
            i as u8
        }
    };
    GEMM_SET.store(i, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

static TMA_STORE: super::Switch = super::Switch::new("TESSERA_GEMM_TS");

/// Overrides `TESSERA_GEMM_TS` for this process (`None`: back to the environment).
pub fn set_tma_store(on: Option<bool>) {
    TMA_STORE.set(on.map(u8::from));
}

/// Benchmarks only: the warp-specialised kernels skip their stores (C is left unwritten), which
/// times the mainloop alone: the ceiling a faster epilogue could reach.
#[doc(hidden)]
pub fn set_skip_stores_for_benchmark(on: bool) {
    SKIP_STORES.store(on, std::sync::atomic::Ordering::Relaxed);
}

static SKIP_STORES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How a GEMM operand is stored. `K`: A as [M, K] (B as [N, K]) rows, K contiguous, `ld`
/// elements between rows. `MN`: A as [K, M] (B as [K, N]), M (N) contiguous, `ld` elements
/// between the rows of consecutive k: a transposed view, read without a copy by wgmma's
/// transpose mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Major {
    K,
    MN,
}

/// Whether products with an M/N-contiguous operand read it as stored (the warp-specialised
/// kernel's MN-major mode) instead of transposing it first. On by default since run 11
/// validated it on an H200 (7 ms of a 94 ms 3B step); `TESSERA_GEMM_MN=0` (or `set_mn_major`)
/// turns it off.
pub fn mn_major_enabled() -> bool {
    MN_MAJOR.get() != Some(0)
}

/// Overrides `TESSERA_GEMM_MN` for this process (`None`: back to the environment).
pub fn set_mn_major(on: Option<bool>) {
    MN_MAJOR.set(on.map(u8::from));
}

static MN_MAJOR: super::Switch = super::Switch::new("TESSERA_GEMM_MN");

/// A bias for the GEMM epilogue: a contiguous copy when the view is not (kept alive by the
/// caller while the product runs) and its device address.
pub(crate) fn contiguous_bias(bias: Option<&Tensor>) -> Result<(Option<Tensor>, Option<u64>)> {
    let Some(t) = bias else {
        return Ok((None, None));
    };
    let t = t.contiguous()?;
    let p = t.cuda_ptr()?;
    Ok((Some(t), Some(p)))
}

/// Raw launch: `batch` products, element strides between products `batch_*` (0 = shared).
#[allow(clippy::too_many_arguments)]
pub fn launch(
    a: u64,
    b: u64,
    c: u64,
    bias: Option<u64>,
    mnk: (usize, usize, usize),
    ld: (usize, usize, usize),
    batch: usize,
    batch_strides: (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    launch_with(
        TcKernel::default_for_device(),
        a,
        b,
        c,
        bias,
        mnk,
        ld,
        batch,
        batch_strides,
        accumulate,
    )
}

/// While profiling, names the next launch's product for the profile's table by shape: "m x k x
/// n" (times the batch), and its FLOPs.
pub(crate) fn note_product(m: usize, n: usize, k: usize, batch: usize) {
    super::profile_note(
        || match batch {
            1 => format!("{m}x{k}x{n}"),
            _ => format!("{batch} x {m}x{k}x{n}"),
        },
        2.0 * (m * n * k * batch) as f64,
    );
}

/// `launch` with an explicit kernel choice.
#[allow(clippy::too_many_arguments)]
pub fn launch_with(
    kernel: TcKernel,
    a: u64,
    b: u64,
    c: u64,
    bias: Option<u64>,
    (m, n, k): (usize, usize, usize),
    (lda, ldb, ldc): (usize, usize, usize),
    batch: usize,
    (batch_a, batch_b, batch_c): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    // A batch stride TMA cannot express (not a multiple of 16 bytes) falls through to the
    // wgmma kernel, which has the same contract.
    if kernel.is_ws()
        && ws_supported(
            (m, n, k),
            (lda, ldb),
            batch,
            (batch_a, batch_b),
            (Major::K, Major::K),
        )
    {
        return launch_ws(
            kernel,
            a,
            b,
            c,
            bias,
            (m, n, k),
            (lda, ldb, ldc),
            batch,
            (batch_a, batch_b, batch_c),
            accumulate,
            (Major::K, Major::K),
        );
    }
    let flags: i64 = bias.is_some() as i64 | ((accumulate as i64) << 1);
    let bias = bias.unwrap_or(0);
    note_product(m, n, k, batch);
    let [m_, n_, k_, lda_, ldb_, ldc_, ba, bb, bc] =
        [m, n, k, lda, ldb, ldc, batch_a, batch_b, batch_c].map(|v| v as i64);
    let (file, name, grid, shared) = match kernel {
        TcKernel::MmaSync => (
            "gemm.cu",
            "gemm_tc_bf16",
            (n.div_ceil(BN) as u32, m.div_ceil(BM) as u32, batch as u32),
            SHARED_BYTES,
        ),
        TcKernel::Wgmma | TcKernel::WgmmaWs | TcKernel::WgmmaWsTma => {
            if device()?.cc != (9, 0) {
                return Err(Error::msg(
                    "gemm: the wgmma kernel needs an sm_90 (Hopper) device",
                ));
            }
            (
                "gemm_sm90.cu",
                "gemm_wgmma_bf16",
                (n.div_ceil(256) as u32, m.div_ceil(128) as u32, batch as u32),
                (3 * (128 + 256) * 64 * 2 + 1024) as u32,
            )
        }
    };
    device()?.launch(
        file,
        name,
        grid,
        (256, 1, 1),
        shared,
        &[
            arg(&a),
            arg(&b),
            arg(&c),
            arg(&bias),
            arg(&m_),
            arg(&n_),
            arg(&k_),
            arg(&lda_),
            arg(&ldb_),
            arg(&ldc_),
            arg(&ba),
            arg(&bb),
            arg(&bc),
            arg(&flags),
        ],
    )
}

/// `launch_with` for operands of any `Major`: the warp-specialised kernel (sm_90) reads an
/// MN-major operand as stored; K-major pairs go through `launch_with`. An MN-major operand
/// needs its `ld` a multiple of 8 and a 16-byte-aligned address; K itself may be any size when
/// both are MN-major (rows past K read as zeros), else a multiple of 8.
#[allow(clippy::too_many_arguments)]
pub fn launch_majors(
    kernel: TcKernel,
    a: u64,
    b: u64,
    c: u64,
    bias: Option<u64>,
    (m, n, k): (usize, usize, usize),
    (lda, ldb, ldc): (usize, usize, usize),
    batch: usize,
    (batch_a, batch_b, batch_c): (usize, usize, usize),
    accumulate: bool,
    majors: (Major, Major),
) -> Result<()> {
    if majors == (Major::K, Major::K) {
        return launch_with(
            kernel,
            a,
            b,
            c,
            bias,
            (m, n, k),
            (lda, ldb, ldc),
            batch,
            (batch_a, batch_b, batch_c),
            accumulate,
        );
    }
    let k_ok = k.is_multiple_of(8) || majors == (Major::MN, Major::MN);
    if !kernel.is_ws()
        || !k_ok
        || !a.is_multiple_of(16)
        || !b.is_multiple_of(16)
        || !ws_supported((m, n, k), (lda, ldb), batch, (batch_a, batch_b), majors)
    {
        return Err(Error::msg(format!(
            "gemm: operands {majors:?} ({m} x {n} x {k}, ld {lda}/{ldb}, batch {batch} x \
             {batch_a}/{batch_b}) need the warp-specialised wgmma kernel, ld a multiple of 8 \
             and 16-byte-aligned operands (got {kernel:?})"
        )));
    }
    launch_ws(
        kernel,
        a,
        b,
        c,
        bias,
        (m, n, k),
        (lda, ldb, ldc),
        batch,
        (batch_a, batch_b, batch_c),
        accumulate,
        majors,
    )
}

/// Shared memory of the warp-specialised kernels: the stage ring (4 x 48 KB at BN = 256, 6 x 32 KB
/// at 128, 8 x 24 KB at 64), 256 bytes of mbarriers and up to 1 KB lost to 1024-byte alignment;
/// the `_ts` kernels add 16 KB per consumer warpgroup for the epilogue.
const WS_SHARED_BYTES: u32 = 196_608 + 256 + 1024;
const WS_EPI_BYTES: u32 = 2 * 16_384;
const WS_BM: usize = 128;
const WS_BK: u32 = 64;

/// Whether the warp-specialised kernel can run this product: TMA needs every byte stride a
/// non-zero multiple of 16 (lda, ldb are, by `eligible`, unless 0; batch strides may not be)
/// below 2^40, and tile coordinates fit in i32.
pub(crate) fn ws_supported(
    (m, n, k): (usize, usize, usize),
    (lda, ldb): (usize, usize),
    batch: usize,
    (batch_a, batch_b): (usize, usize),
    (major_a, major_b): (Major, Major),
) -> bool {
    // The dimension `ld` steps over: M (N) for a K-major operand, K for an MN-major one.
    let outer = |major: Major, rows: usize| if major == Major::K { rows } else { k };
    let small = |v: usize| v < (1 << 31);
    let stride_ok = |s: usize| s.is_multiple_of(8) && s * 2 < (1 << 40);
    let batched = batch > 1;
    small(m)
        && small(n)
        && small(k)
        && small(batch)
        && stride_ok(lda)
        && stride_ok(ldb)
        && (outer(major_a, m) == 1 || lda > 0)
        && (outer(major_b, n) == 1 || ldb > 0)
        && (!batched || batch_a == 0 || stride_ok(batch_a))
        && (!batched || batch_b == 0 || stride_ok(batch_b))
        && small(m.div_ceil(WS_BM) * n.div_ceil(64) * batch)
}

/// The warp-specialised kernel's tile widths: (BN, the time of one 128 x BN tile against one
/// 128 x 256 tile of the same K, kernel name). A narrower tile does less work but reloads its
/// operands for fewer outputs: per FLOP, wgmma reads (64 + BN) / 64·BN bytes of shared memory
/// (0.020 at 256, 0.023 at 128, 0.031 at 64) and TMA 1.33x / 2x the bytes of a 256 tile. Run
/// 12's N = 256 products on 64-wide tiles ran at ~340 TFLOP/s where 256-wide ones reach ~600:
/// the estimates below take 128 at ~86% and 64 at ~62% of the 256 tile's rate.
const WS_WIDTHS: [(usize, f64, &str); 3] = [
    (256, 1.0, "gemm_wgmma_ws_bf16"),
    (128, 0.58, "gemm_wgmma_ws_n128_bf16"),
    (64, 0.40, "gemm_wgmma_ws_n64_bf16"),
];

/// `TESSERA_GEMM_BN=0`: tile widths by the rule before the wave model (see [`ws_block_n`]), for
/// measuring what the model gains.
static BN_RULE: super::Switch = super::Switch::new("TESSERA_GEMM_BN");

/// Overrides `TESSERA_GEMM_BN` for this process (`Some(0)`: the old rule; `None`: back to the
/// environment).
pub fn set_block_n_rule(v: Option<u8>) {
    BN_RULE.set(v);
}

/// Block-tile width of the warp-specialised kernel and the kernel's name.
///
/// The grid is persistent, one CTA an SM, so a product takes ⌈tiles / SMs⌉ waves of tiles and
/// the last wave may leave most SMs idle: 160 tiles of 128 x 256 (the vision tower's N = 1280
/// products over 4096 patches, the text q/k/v weight gradient) are 2 waves, the second 21%
/// full. The width chosen minimises waves × the tile's relative time (`WS_WIDTHS`), the wider
/// on a tie: there 128-wide tiles take 3 waves of 0.58, 1.74 against 2.0. On the 3B step's
/// products this changes 21 of 38 shapes (counted, not measured: ~1.4 ms of ~50).
///
/// `TESSERA_GEMM_BN=0` keeps the old rule: 256 unless the product has fewer 128 x 256 tiles
/// than SMs, then 128, then 64.
pub(crate) fn ws_block_n(m: usize, n: usize, batch: usize, sms: usize) -> (usize, &'static str) {
    ws_block_n_by(BN_RULE.get() != Some(0), m, n, batch, sms)
}

/// `ws_block_n` by the wave model (`by_waves`) or by the old rule, whatever the switch says.
pub(crate) fn ws_block_n_by(
    by_waves: bool,
    m: usize,
    n: usize,
    batch: usize,
    sms: usize,
) -> (usize, &'static str) {
    let tiles = |bn: usize| m.div_ceil(WS_BM) * n.div_ceil(bn) * batch;
    let sms = sms.max(1);
    if !by_waves {
        let (bn, _, name) = *WS_WIDTHS
            .iter()
            .find(|w| tiles(w.0) >= sms)
            .unwrap_or(&WS_WIDTHS[2]);
        return (bn, name);
    }
    let time = |&(bn, cost, _): &(usize, f64, &str)| tiles(bn).div_ceil(sms) as f64 * cost;
    let mut best = WS_WIDTHS[0];
    for w in &WS_WIDTHS[1..] {
        if time(w) < time(&best) {
            best = *w;
        }
    }
    (best.0, best.2)
}

/// TMA descriptor of a bf16 operand of `rows` (M or N) x `k`, `batch` copies `batch_stride`
/// apart (rank 3; rank 2 when not batched or shared), 128-byte swizzle, outside the tensor read
/// as zeros. K-major: rows of K, `ld` apart, boxes of 64 (K, 128 bytes) x `box_rows`. MN-major:
/// rows of M/N (one per k), `ld` apart, boxes of 64 (M/N) x 64 (K). Returns the map and whether
/// it has the batch dimension.
fn tensor_map(
    ptr: u64,
    (rows, k, ld): (usize, usize, usize),
    batch: usize,
    batch_stride: usize,
    box_rows: u32,
    major: Major,
) -> Result<(sys::CUtensorMap, bool)> {
    let batched = batch > 1 && batch_stride > 0;
    let (inner, outer, boxes) = match major {
        Major::K => (k, rows, [WS_BK, box_rows, 1]),
        Major::MN => (rows, k, [64, WS_BK, 1]),
    };
    // With one outer row the row stride is never used; keep it a legal value.
    let ld = if outer == 1 {
        inner.next_multiple_of(8)
    } else {
        ld
    };
    let dims: [u64; 3] = [inner as u64, outer as u64, batch as u64];
    let strides: [u64; 2] = [ld as u64 * 2, batch_stride as u64 * 2];
    let rank = if batched { 3 } else { 2 };
    let map =
        encode_tma_bf16(ptr, &dims[..rank], &strides[..rank - 1], &boxes[..rank]).map_err(|r| {
            Error::msg(format!(
                "gemm: cuTensorMapEncodeTiled failed ({r:?}) for a {major:?}-major bf16 operand \
                 of {rows} x {k}, row stride {ld}, batch {batch} x stride {batch_stride}, box \
                 {boxes:?}"
            ))
        })?;
    Ok((map, batched))
}

/// A TMA descriptor of a bf16 tensor at `ptr`: `dims` innermost first (the innermost
/// contiguous), byte `strides` of the outer dims, `boxes` elements per dim; 128-byte swizzle
/// (the innermost box is 64 elements), zeros read outside the tensor. The driver's error code
/// on failure.
pub(crate) fn encode_tma_bf16(
    ptr: u64,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
) -> std::result::Result<sys::CUtensorMap, sys::CUresult> {
    encode_tma(
        ptr,
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        dims,
        strides,
        boxes,
    )
}

/// A TMA descriptor of a flat f32 vector of `len` elements at `ptr`, boxes of `bx` elements
/// (at most 256), no swizzle, zeros read past the end.
pub(crate) fn encode_tma_f32_1d(
    ptr: u64,
    len: u64,
    bx: u32,
) -> std::result::Result<sys::CUtensorMap, sys::CUresult> {
    encode_tma(
        ptr,
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
        &[len],
        &[],
        &[bx],
    )
}

fn encode_tma(
    ptr: u64,
    dtype: sys::CUtensorMapDataType,
    swizzle: sys::CUtensorMapSwizzle,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
) -> std::result::Result<sys::CUtensorMap, sys::CUresult> {
    assert!(
        (1..=5).contains(&dims.len())
            && strides.len() + 1 == dims.len()
            && boxes.len() == dims.len(),
        "encode_tma: rank mismatch"
    );
    let element_strides = [1u32; 5];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: dims and boxes hold `rank` entries, strides rank - 1, element_strides 5 >= rank;
    // `map` is a 64-byte-aligned 128-byte CUtensorMap the driver writes; ptr is a live device
    // address.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            dims.len() as u32,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(r);
    }
    Ok(map)
}

/// The warp-specialised kernel (kernels/gemm_sm90.cu, `gemm_wgmma_ws_*`): persistent, one
/// CTA of 384 threads per SM, operands through TMA descriptors passed by value.
#[allow(clippy::too_many_arguments)]
fn launch_ws(
    kernel: TcKernel,
    a: u64,
    b: u64,
    c: u64,
    bias: Option<u64>,
    (m, n, k): (usize, usize, usize),
    (lda, ldb, ldc): (usize, usize, usize),
    batch: usize,
    (batch_a, batch_b, batch_c): (usize, usize, usize),
    accumulate: bool,
    (major_a, major_b): (Major, Major),
) -> Result<()> {
    let dev = device()?;
    if dev.cc != (9, 0) {
        return Err(Error::msg(
            "gemm: the warp-specialised wgmma kernel needs an sm_90 (Hopper) device",
        ));
    }
    if m == 0 || n == 0 || k == 0 || batch == 0 {
        return Ok(());
    }
    let sms = dev.sm_count.max(1) as usize;
    let (bn, base) = ws_block_n(m, n, batch, sms);
    let suffix = match (major_a, major_b) {
        (Major::K, Major::K) => "",
        (Major::MN, Major::K) => "_ta",
        (Major::K, Major::MN) => "_tb",
        (Major::MN, Major::MN) => "_tab",
    };
    // The TMA-store epilogue: C's map, boxes of 64 x 64 (batched: a third dimension); not when
    // accumulating, or where TMA cannot address C.
    let c3 = batch > 1;
    let ts = kernel == TcKernel::WgmmaWsTma
        && !accumulate
        && c.is_multiple_of(16)
        && ldc.is_multiple_of(8)
        && (!c3 || (batch_c > 0 && batch_c.is_multiple_of(8)));
    let map_c = if ts {
        let dims = [n as u64, m as u64, batch as u64];
        let strides = [ldc as u64 * 2, batch_c as u64 * 2];
        let rank = if c3 { 3 } else { 2 };
        encode_tma_bf16(c, &dims[..rank], &strides[..rank - 1], &[64, 64, 1][..rank]).map_err(
            |r| {
                Error::msg(format!(
                    "gemm: cuTensorMapEncodeTiled failed ({r:?}) for C of {m} x {n}, row stride \
                     {ldc}, batch {batch} x stride {batch_c}"
                ))
            },
        )?
    } else {
        sys::CUtensorMap { opaque: [0; 16] }
    };
    let name = format!("{base}{}{suffix}", if ts { "_ts" } else { "" });
    let (map_a, a3) = tensor_map(a, (m, k, lda), batch, batch_a, WS_BM as u32, major_a)?;
    let (map_b, b3) = tensor_map(b, (n, k, ldb), batch, batch_b, bn as u32, major_b)?;
    let tiles = m.div_ceil(WS_BM) * n.div_ceil(bn) * batch;
    let skip = SKIP_STORES.load(std::sync::atomic::Ordering::Relaxed);
    let flags: i64 = bias.is_some() as i64
        | ((accumulate as i64) << 1)
        | ((a3 as i64) << 2)
        | ((b3 as i64) << 3)
        | ((skip as i64) << 4)
        | (((ts && c3) as i64) << 5);
    let bias = bias.unwrap_or(0);
    let [m_, n_, k_, ldc_, batch_, bc] = [m, n, k, ldc, batch, batch_c].map(|v| v as i64);
    note_product(m, n, k, batch);
    dev.launch(
        "gemm_sm90.cu",
        &name,
        (tiles.min(sms) as u32, 1, 1),
        (384, 1, 1),
        WS_SHARED_BYTES + if ts { WS_EPI_BYTES } else { 0 },
        &[
            arg(&map_a),
            arg(&map_b),
            arg(&map_c),
            arg(&c),
            arg(&bias),
            arg(&m_),
            arg(&n_),
            arg(&k_),
            arg(&ldc_),
            arg(&batch_),
            arg(&bc),
            arg(&flags),
        ],
    )
}

/// `a [.., M, K] · b[N, K]ᵀ (+ bias[N])` for bf16 CUDA tensors, no autograd. `a` and `b` are
/// made contiguous; K must be a multiple of 8.
pub fn matmul_bt(a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    matmul_bt_with(TcKernel::default_for_device(), a, b, bias)
}

/// `matmul_bt` with an explicit kernel choice.
pub fn matmul_bt_with(
    kernel: TcKernel,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if a.dtype() != DType::BF16 || b.dtype() != DType::BF16 || !a.is_cuda() || !b.is_cuda() {
        return Err(Error::msg("gemm_tc: bf16 cuda tensors only"));
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let k = *a.shape().last().unwrap_or(&0);
    if b.rank() != 2 || b.dim(1)? != k {
        return Err(Error::shape(
            "gemm_tc",
            format!("{:?} x {:?}ᵀ", a.shape(), b.shape()),
        ));
    }
    let n = b.dim(0)?;
    let m = a.numel() / k.max(1);
    if !eligible(k, k, k, a.cuda_ptr()?, b.cuda_ptr()?) {
        return Err(Error::msg(format!(
            "gemm_tc: K = {k} is not a multiple of 8"
        )));
    }
    let mut shape = a.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = n;
    let out = Tensor::empty_cuda(&shape, DType::BF16)?;
    let (_bias, bias_ptr) = contiguous_bias(bias)?;
    launch_with(
        kernel,
        a.cuda_ptr()?,
        b.cuda_ptr()?,
        out.cuda_ptr()?,
        bias_ptr,
        (m, n, k),
        (k, k, n),
        1,
        (0, 0, 0),
        false,
    )?;
    Ok(out)
}

#[cfg(test)]
mod block_n_tests {
    use super::*;

    #[test]
    fn tile_widths_by_waves() {
        let sms = 132;
        let bn = |m, n| ws_block_n(m, n, 1, sms).0;
        // Many waves: the widest tile.
        assert_eq!(bn(4096, 151936), 256);
        assert_eq!(bn(4096, 11008), 256);
        // 160 tiles of 256 (2 waves, the second 21% full): 128 (3 waves of 0.58).
        assert_eq!(bn(4096, 1280), 128);
        assert_eq!(bn(2560, 2048), 128);
        // 128 tiles of 256 (one wave): 256, where the old rule took 128 (two waves).
        assert_eq!(bn(2048, 2048), 256);
        // A narrow product: 64 (one wave of 128 tiles).
        assert_eq!(bn(4096, 256), 64);
        // Few tiles at any width: the narrowest (one wave whatever the width).
        assert_eq!(bn(128, 128), 64);
        assert_eq!(bn(1024, 1024), 64);
        // The batch counts tiles too.
        assert_eq!(ws_block_n(2048, 2048, 4, sms).0, 256);
        // The old rule, kept behind TESSERA_GEMM_BN=0.
        set_block_n_rule(Some(0));
        let old = [
            bn(4096, 1280),
            bn(2048, 2048),
            bn(4096, 256),
            bn(1024, 1024),
        ];
        set_block_n_rule(None);
        assert_eq!(old, [256, 128, 64, 64]);
    }
}

#[cfg(test)]
mod choice_tests {
    use super::*;

    /// `--gemm`'s names: an unknown one is an error that lists the others; a choice made for a
    /// call is undone after it, whatever it was before.
    #[test]
    fn gemm_choices_are_checked_and_restored() {
        let err = set_gemm_choice(Some("cuBLAS")).unwrap_err().to_string();
        assert!(err.contains("unknown") && err.contains("cublas"), "{err}");
        let before = gemm_choice();
        with_gemm_choice("mma", || {
            assert_eq!(gemm_choice(), "mma");
            with_gemm_choice("default", || {
                assert_eq!(gemm_choice(), "");
                Ok(())
            })
        })
        .unwrap();
        assert_eq!(gemm_choice(), before);
    }
}
