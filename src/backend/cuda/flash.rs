//! Launchers of the tensor-core flash attention (kernels/flash.cu): forward, and the dK/dV and
//! dQ backward kernels, with optional variable-length segments (`cu_seqlens`).

use super::{arg, device};
use crate::{DType, Device, Error, Result, Tensor};

/// Variable-length segments on the device, one visibility relation stored both ways: query i
/// sees keys [key_lo[i], key_hi[i]) (u32 [Tq]; forward and dQ), key j is seen by queries
/// [query_lo[j], query_hi[j]) (u32 [Tk]; dK/dV). The kernels skip whole tiles outside them.
#[derive(Clone)]
pub struct Segments {
    key_lo: Tensor,
    key_hi: Tensor,
    query_lo: Tensor,
    query_hi: Tensor,
    /// The longest segment's length (tokens).
    max_len: usize,
    /// The segments' common length when there is at least one and all are equal (no empty
    /// one): the kernels without segments can take them as a batch (`batched_uniform`).
    uniform_len: Option<usize>,
}

impl Segments {
    /// Block-diagonal segments of a packed sequence of T tokens from its boundaries
    /// `cu_seqlens` = [0, t1, ..., T] (non-decreasing; Tq == Tk == T): token i sees exactly the
    /// tokens of its own segment, so the per-key query range is the same array.
    pub fn from_cu_seqlens(cu_seqlens: &[usize]) -> Result<Segments> {
        let t = cu_seqlens.last().copied().unwrap_or(0);
        if cu_seqlens.first() != Some(&0)
            || cu_seqlens.windows(2).any(|w| w[0] > w[1])
            || t > i32::MAX as usize
        {
            return Err(Error::msg(format!(
                "flash segments: cu_seqlens must rise from 0 to T < 2^31, got {cu_seqlens:?}"
            )));
        }
        let (mut lo, mut hi) = (vec![0u32; t], vec![0u32; t]);
        for w in cu_seqlens.windows(2) {
            lo[w[0]..w[1]].fill(w[0] as u32);
            hi[w[0]..w[1]].fill(w[1] as u32);
        }
        let (lo, hi) = crate::no_grad(|| -> Result<(Tensor, Tensor)> {
            Ok((
                Tensor::from_vec(lo, &[t])?.to_device(Device::Cuda)?,
                Tensor::from_vec(hi, &[t])?.to_device(Device::Cuda)?,
            ))
        })?;
        Ok(Segments {
            query_lo: lo.clone(),
            query_hi: hi.clone(),
            key_lo: lo,
            key_hi: hi,
            max_len: cu_seqlens
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or(0),
            uniform_len: uniform_len(cu_seqlens),
        })
    }

    /// Checks the lengths against Tq and Tk; the device pointers (key_lo, key_hi, query_lo,
    /// query_hi).
    fn ptrs(&self, op: &'static str, tq: usize, tk: usize) -> Result<[u64; 4]> {
        if self.key_lo.shape() != [tq] || self.query_lo.shape() != [tk] {
            return Err(Error::shape(
                op,
                format!(
                    "segments cover {:?} queries / {:?} keys, attention has {tq} / {tk}",
                    self.key_lo.shape(),
                    self.query_lo.shape()
                ),
            ));
        }
        Ok([
            self.key_lo.cuda_ptr()?,
            self.key_hi.cuda_ptr()?,
            self.query_lo.cuda_ptr()?,
            self.query_hi.cuda_ptr()?,
        ])
    }
}

/// The common length of the segments of `cu_seqlens` when there is at least one and all have it
/// (none empty).
fn uniform_len(cu_seqlens: &[usize]) -> Option<usize> {
    let len = cu_seqlens.get(1).copied().filter(|&l| l > 0)?;
    cu_seqlens
        .windows(2)
        .all(|w| w[1] - w[0] == len)
        .then_some(len)
}

/// Device pointers of optional segments (null where none).
fn segment_ptrs(
    seg: Option<&Segments>,
    op: &'static str,
    tq: usize,
    tk: usize,
) -> Result<[u64; 4]> {
    seg.map_or(Ok([0; 4]), |s| s.ptrs(op, tq, tk))
}

/// Softmax(q kᵀ · scale) v for bf16 CUDA tensors q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D]
/// (Hq a multiple of Hkv; D in 64, 80, 128). Returns (o [B, Hq, Tq, D] bf16, lse [B, Hq, Tq]
/// f32; a row that sees no key gets o = 0, lse = -inf). No autograd.
pub fn flash_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    flash_fwd_segments(q, k, v, causal, scale, None)
}

/// Queries per forward block (64 MT with MT = 2, kernels/flash.cu).
const FWD_BM: usize = 128;

/// `flash_fwd` whose rows see only their segment's keys (when `segments` is given).
pub fn flash_fwd_segments(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
    segments: Option<&Segments>,
) -> Result<(Tensor, Tensor)> {
    let d = q.dims().last().copied().unwrap_or(0);
    let keys = k.dims().get(2).copied().unwrap_or(0);
    let hopper_fwd = wgmma_d(d) && keys > 0 && wgmma_mode() > 0 && hopper();
    let batched = segments.and_then(|s| batched_uniform(s, q, k));
    if let (true, Some(len)) = (hopper_fwd, batched) {
        // [B, H, n·L, D] as [B·H·n, 1, L, D] (contiguous views), and back.
        let (qb, kb, vb) = (as_batch(q, len)?, as_batch(k, len)?, as_batch(v, len)?);
        let (o, lse) = flash_fwd_wgmma_with(&qb, &kb, &vb, causal, scale, wgmma_mode())?;
        return Ok((o.reshape(q.shape())?, lse.reshape(&q.shape()[..3])?));
    }
    if segments.is_none() && hopper_fwd {
        return flash_fwd_wgmma_with(q, k, v, causal, scale, wgmma_mode());
    }
    let bn = if d == 128 && segments.is_some() {
        32
    } else {
        64
    };
    // Segments of at most 64 tokens (the vision windows): 64-query blocks, whose key hull is
    // their own segment's, where a 128-query block spans two and masks half its products.
    let bm = match segments {
        Some(s) if s.max_len <= 64 && d <= 80 && seg_m64() => 64,
        _ => FWD_BM,
    };
    fwd(q, k, v, causal, scale, segments, bm, bn)
}

/// Whether `flash_fwd_segments` takes 64-query blocks for segments of at most 64 tokens (on by
/// default; `TESSERA_FLASH_SEG_M64=0`, or `set_seg_m64`, keeps the 128-query blocks).
pub fn seg_m64() -> bool {
    SEG_M64.get() != Some(0)
}

/// Overrides `TESSERA_FLASH_SEG_M64` for this process (`None`: back to the environment).
pub fn set_seg_m64(on: Option<bool>) {
    SEG_M64.set(on.map(u8::from));
}

static SEG_M64: super::Switch = super::Switch::new("TESSERA_FLASH_SEG_M64");

/// Whether the Hopper kernels (forward and backward) take head dim 80 (the vision tower's, in
/// the layout of 128 with the columns past 80 zero-filled by the TMA loads) and segments of one
/// common length of at least 128 tokens (the vision tower's whole images) as a batch of
/// sequences. Off by default until a GPU run validates them; `TESSERA_FLASH_WG_D80=1` (or
/// `set_wgmma_d80`) turns them on.
pub fn wgmma_d80() -> bool {
    WGMMA_D80.get().is_some_and(|v| v != 0)
}

/// Overrides `TESSERA_FLASH_WG_D80` for this process (`None`: back to the environment).
pub fn set_wgmma_d80(on: Option<bool>) {
    WGMMA_D80.set(on.map(u8::from));
}

static WGMMA_D80: super::Switch = super::Switch::new("TESSERA_FLASH_WG_D80");

/// Whether the Hopper kernels take head dim `d`: 64 and 128, and 80 under `wgmma_d80`.
fn wgmma_d(d: usize) -> bool {
    matches!(d, 64 | 128) || (d == 80 && wgmma_d80())
}

/// The head dim the Hopper kernels lay `d` out in (shared memory, registers): 80 in 128's.
fn wgmma_layout_d(d: usize) -> usize {
    if d == 80 {
        128
    } else {
        d
    }
}

/// Segments' common length when (under `wgmma_d80`) the kernels without segments may take them
/// as a batch: one length of at least 128 tokens (a whole 128-query block each) that covers the
/// sequence, one query head a kv head (a batch index serves q and k alike), q and k contiguous
/// (a view), and at most 65535 sequences in all (the grid's z). The callers check that the
/// Hopper kernels take the head dim (`wgmma_d`).
fn batched_uniform(s: &Segments, q: &Tensor, k: &Tensor) -> Option<usize> {
    let len = s.uniform_len.filter(|&l| l >= 128)?;
    let sh = q.shape();
    (wgmma_d80()
        && q.rank() == 4
        && q.shape() == k.shape()
        && s.key_lo.shape() == [sh[2]]
        && sh[2].is_multiple_of(len)
        && sh[0] * sh[1] * (sh[2] / len) <= u16::MAX as usize
        && q.is_contiguous()
        && k.is_contiguous())
    .then_some(len)
}

/// A contiguous [B, H, n·len, D] tensor as the batch [B·H·n, 1, len, D] (a view).
fn as_batch(t: &Tensor, len: usize) -> Result<Tensor> {
    let s = t.shape();
    t.contiguous()?
        .reshape(&[s[0] * s[1] * (s[2] / len), 1, len, s[3]])
}

/// `flash_fwd` with chosen tiles, for benchmarks and tests: (queries per block, keys per tile)
/// = the default (128, 64), or the variants (128, 32) at D 128 (no spilled registers), (64, 32)
/// at D 128 and (64, 64) at D 64 (fewer registers, more blocks per SM).
pub fn flash_fwd_tiles(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
    block_q: usize,
    key_tile: usize,
) -> Result<(Tensor, Tensor)> {
    fwd(q, k, v, causal, scale, None, block_q, key_tile)
}

/// Which forward without segments runs on an sm_90 device: 0 the mma.sync kernel, else the
/// Hopper kernel (`flash_fwd_wgmma_with`) with that schedule: 1 plain, 2 with
/// FlashAttention-3's intra-warpgroup overlap, 3 with the overlap and the inter-warpgroup
/// pingpong. 2 by default (run 11 on an H200: 89% of SDPA at D 128, 87% at D 64);
/// `TESSERA_FLASH_WG=0`, `1` or `3` (or `set_wgmma`) picks the others.
pub fn wgmma_mode() -> u8 {
    match WGMMA.get() {
        Some(m) if m <= 3 => m,
        _ => 2,
    }
}

/// Overrides `TESSERA_FLASH_WG` for this process (0 to 3 as `wgmma_mode`; `None`: back to the
/// environment).
pub fn set_wgmma(mode: Option<u8>) {
    WGMMA.set(mode.map(|m| m.min(3)));
}

static WGMMA: super::Switch = super::Switch::new("TESSERA_FLASH_WG");

/// Whether `flash_bwd` (no segments, D 64 or 128, and 80 under `wgmma_d80`, on an sm_90
/// device) takes its gradients from the Hopper kernels (`flash_bwd_wgmma`). On by default
/// since run 12 validated them on an H200 (86-89% of SDPA's backward);
/// `TESSERA_FLASH_WG_BWD=0` (or `set_wgmma_bwd`) turns them off.
pub fn wgmma_bwd() -> bool {
    WGMMA_BWD.get() != Some(0)
}

/// Overrides `TESSERA_FLASH_WG_BWD` for this process (`None`: back to the environment).
pub fn set_wgmma_bwd(on: Option<bool>) {
    WGMMA_BWD.set(on.map(u8::from));
}

static WGMMA_BWD: super::Switch = super::Switch::new("TESSERA_FLASH_WG_BWD");

/// `TESSERA_FLASH_BWD_PAD=0`: the Hopper backward's lse / delta rows unpadded (a diagnosis of
/// the misaligned TMA boxes that padding avoids; see `grads_wgmma`).
static BWD_PAD: super::Switch = super::Switch::new("TESSERA_FLASH_BWD_PAD");

/// Pipeline stages of the Hopper dK/dV kernel's Q/dO/lse/delta stream: 2, or 3 with
/// `TESSERA_FLASH_WG_BWD_STAGES=3` (or `set_wgmma_bwd_stages`; more loads in flight against the
/// L2 latency, 33 KiB more shared memory at D 128; benchmarked beside 2 stages by the GPU check,
/// not yet run on a GPU).
pub fn wgmma_bwd_stages() -> usize {
    if WGMMA_BWD_STAGES.get() == Some(3) {
        3
    } else {
        2
    }
}

/// Overrides `TESSERA_FLASH_WG_BWD_STAGES` for this process (`None`: back to the environment).
pub fn set_wgmma_bwd_stages(stages: Option<u8>) {
    WGMMA_BWD_STAGES.set(stages);
}

static WGMMA_BWD_STAGES: super::Switch = super::Switch::new("TESSERA_FLASH_WG_BWD_STAGES");

fn hopper() -> bool {
    device().is_ok_and(|d| d.cc == (9, 0))
}

/// Queries per block of the Hopper forward (kernels/flash_sm90.cu).
const WG_BM: usize = 128;
/// Keys per block of the Hopper dK/dV kernel (FB_BK in kernels/flash_sm90.cu), and per tile of
/// its dQ kernel.
const WG_BK: usize = 128;

/// `flash_fwd` (no segments) through the Hopper kernel (kernels/flash_sm90.cu: TMA, wgmma,
/// a producer and two consumer warpgroups); sm_90 only, D 64, 80 (in the layout of 128) or 128.
pub fn flash_fwd_wgmma(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    flash_fwd_wgmma_with(q, k, v, causal, scale, 1)
}

/// `flash_fwd_wgmma` with a `schedule` of the consumers' work: 1 one tile's products and
/// softmax in turn (`flash_fwd_wg_d*`); 2 FlashAttention-3's intra-warpgroup overlap
/// (`flash_fwd_wgo_d*`: the softmax of a key tile runs while the previous tile's P V does);
/// 3 that and the inter-warpgroup pingpong (`flash_fwd_wgp_d*`: the two consumers take turns
/// on the tensor cores).
pub fn flash_fwd_wgmma_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
    schedule: u8,
) -> Result<(Tensor, Tensor)> {
    let (b, hq, tq, d, hkv, tk) = check_fwd(q, k, v)?;
    if !matches!(d, 64 | 80 | 128) || !hopper() {
        return Err(Error::msg(format!(
            "flash_fwd_wgmma: needs an sm_90 device and head dim 64, 80 or 128 (got {d})"
        )));
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if tk == 0
        || [&q, &k, &v]
            .iter()
            .any(|t| t.cuda_ptr().map_or(true, |p| p % 16 != 0))
    {
        // No keys, or an operand TMA cannot address: the mma.sync kernel.
        return fwd(&q, &k, &v, causal, scale, None, FWD_BM, 64);
    }
    let o = Tensor::empty_cuda(&[b, hq, tq, d], DType::BF16)?;
    let lse = Tensor::empty_cuda(&[b, hq, tq], DType::F32)?;
    if b * hq * tq == 0 {
        return Ok((o, lse));
    }
    let map = |t: &Tensor, heads: usize, len: usize, rows: usize| {
        head_map("flash_fwd_wgmma", t, b * heads, len, d, rows as u32)
    };
    // Keys per tile and K/V stages (FLASH_FWD_WG in the kernel file).
    // 128 keys throughout: 3 stages at D 128 take 225 KB of the 227 KB.
    let (bn, stages, kernel) = match schedule {
        1 => (128, 2, "wg"),
        2 => (128, 3, "wgo"),
        3 => (128, 3, "wgp"),
        _ => {
            return Err(Error::msg(format!(
                "flash_fwd_wgmma: schedule {schedule} is not 1, 2 or 3"
            )))
        }
    };
    let (mq, mk, mv) = (
        map(&q, hq, tq, WG_BM)?,
        map(&k, hkv, tk, bn)?,
        map(&v, hkv, tk, bn)?,
    );
    let (op, lp) = (o.cuda_ptr()?, lse.cuda_ptr()?);
    let [hq_, hkv_, tq_, tk_] = [hq, hkv, tq, tk].map(|x| x as i64);
    let (scale, causal) = (scale as f32, causal as i64);
    // mbarriers, 1024-byte alignment, Q and the K/V stages (in the layout of 128 at D 80).
    let ld = wgmma_layout_d(d);
    let shared = (256 + 1024 + WG_BM * ld * 2 + stages * 2 * bn * ld * 2) as u32;
    device()?.launch(
        "flash_sm90.cu",
        &format!("flash_fwd_{kernel}_d{d}"),
        (tq.div_ceil(WG_BM) as u32, hq as u32, b as u32),
        (384, 1, 1),
        shared,
        &[
            arg(&mq),
            arg(&mk),
            arg(&mv),
            arg(&op),
            arg(&lp),
            arg(&hq_),
            arg(&hkv_),
            arg(&tq_),
            arg(&tk_),
            arg(&scale),
            arg(&causal),
        ],
    )?;
    Ok((o, lse))
}

/// Validates the forward's q, k, v: (B, Hq, Tq, D, Hkv, Tk).
fn check_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(usize, usize, usize, usize, usize, usize)> {
    for t in [q, k, v] {
        if t.dtype() != DType::BF16 || !t.is_cuda() || t.rank() != 4 {
            return Err(Error::msg(format!(
                "flash_fwd: wants bf16 cuda tensors of rank 4, got {:?} {} on {}",
                t.shape(),
                t.dtype(),
                t.device()
            )));
        }
    }
    let (b, hq, tq, d) = (q.dim(0)?, q.dim(1)?, q.dim(2)?, q.dim(3)?);
    let (hkv, tk) = (k.dim(1)?, k.dim(2)?);
    if k.shape() != v.shape() || k.dim(0)? != b || k.dim(3)? != d || hkv == 0 || hq % hkv != 0 {
        return Err(Error::shape(
            "flash_fwd",
            format!("q {:?} k {:?} v {:?}", q.shape(), k.shape(), v.shape()),
        ));
    }
    if ![64, 80, 128].contains(&d) {
        return Err(Error::shape(
            "flash_fwd",
            format!("head dim {d} (supported: 64, 80, 128)"),
        ));
    }
    // The kernels index positions in 32 bits.
    if tq.max(tk) >= 1 << 30 {
        return Err(Error::shape(
            "flash_fwd",
            format!("sequence lengths tq {tq}, tk {tk} (at most 2^30)"),
        ));
    }
    Ok((b, hq, tq, d, hkv, tk))
}

#[allow(clippy::too_many_arguments)]
fn fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
    segments: Option<&Segments>,
    bm: usize,
    bn: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, hq, tq, d, hkv, tk) = check_fwd(q, k, v)?;
    let [klo, khi, _, _] = segment_ptrs(segments, "flash_fwd", tq, tk)?;
    let seg = if segments.is_some() { "seg_" } else { "" };
    // Block: bm queries; key tiles of bn keys, double-buffered K and V (kernels/flash.cu:
    // FA_FWD_BN, and the benchmark variants after the entry points).
    let (prefix, suffix) = match (bm, d, bn, segments.is_some()) {
        (FWD_BM, 64 | 80 | 128, 64, false)
        | (FWD_BM, 64 | 80, 64, true)
        | (FWD_BM, 128, 32, true) => ("", ""),
        (FWD_BM, 128, 32, false) => ("", "_bn32"),
        (64, 128, 32, false) | (64, 64, 64, false) | (64, 64 | 80, 64, true) => ("m64_", ""),
        _ => {
            let with = if segments.is_some() {
                " with segments"
            } else {
                ""
            };
            return Err(Error::msg(format!(
                    "flash_fwd: no kernel with {bm}-query blocks and {bn}-key tiles at head dim {d}{with}"
                )));
        }
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let o = Tensor::empty_cuda(&[b, hq, tq, d], DType::BF16)?;
    let lse = Tensor::empty_cuda(&[b, hq, tq], DType::F32)?;
    let (qp, kp, vp, op, lp) = (
        q.cuda_ptr()?,
        k.cuda_ptr()?,
        v.cuda_ptr()?,
        o.cuda_ptr()?,
        lse.cuda_ptr()?,
    );
    let [hq_, hkv_, tq_, tk_] = [hq, hkv, tq, tk].map(|x| x as i64);
    let (scale, causal) = (scale as f32, causal as i64);
    let shared = ((bm + 4 * bn) * (d + 8) * 2) as u32;
    device()?.launch(
        "flash.cu",
        &format!("flash_fwd_{seg}{prefix}d{d}{suffix}"),
        (tq.div_ceil(bm) as u32, hq as u32, b as u32),
        (128, 1, 1),
        shared,
        &[
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&op),
            arg(&lp),
            arg(&klo),
            arg(&khi),
            arg(&hq_),
            arg(&hkv_),
            arg(&tq_),
            arg(&tk_),
            arg(&scale),
            arg(&causal),
        ],
    )?;
    Ok((o, lse))
}

/// Gradients of `flash_fwd` for upstream `g` [B, Hq, Tq, D]: (dq, dk, dv), deterministic (no
/// atomics): dK/dV per key tile summing the GQA group, dQ per query tile (kernels/flash.cu, or
/// the Hopper kernels of `flash_bwd_wgmma` under `wgmma_bwd`).
#[allow(clippy::too_many_arguments)]
pub fn flash_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    causal: bool,
    scale: f64,
    segments: Option<&Segments>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = q.dim(3)?;
    let hopper_bwd = wgmma_d(d) && wgmma_bwd() && hopper();
    if let (true, Some(len)) = (hopper_bwd, segments.and_then(|s| batched_uniform(s, q, k))) {
        if o.shape() == q.shape() && g.shape() == q.shape() {
            // As the forward: the segments as a batch of sequences, and back.
            let (qb, kb, vb) = (as_batch(q, len)?, as_batch(k, len)?, as_batch(v, len)?);
            let (ob, gb) = (as_batch(o, len)?, as_batch(g, len)?);
            let lb = lse.contiguous()?.reshape(&qb.shape()[..3])?;
            let wg = Some(None);
            let (dq, dk, dv) = bwd(&qb, &kb, &vb, &ob, &lb, &gb, causal, scale, None, wg, true)?;
            return Ok((
                dq.reshape(q.shape())?,
                dk.reshape(k.shape())?,
                dv.reshape(v.shape())?,
            ));
        }
    }
    let wg = (segments.is_none() && hopper_bwd).then_some(None);
    bwd(q, k, v, o, lse, g, causal, scale, segments, wg, true)
}

/// `flash_bwd` (no segments) by the Hopper kernels (kernels/flash_sm90.cu: TMA loads by a
/// producer warpgroup, every product by wgmma): dK/dV with K/V resident and Q/dO tiles
/// streamed, dQ with Q/dO resident and K/V tiles streamed; sm_90 only, D 64, 80 (in the layout
/// of 128) or 128.
/// `split`: dK/dV by one block per query head, f32 partials summed over the GQA group
/// afterwards (`None`: when B · Hkv · Tk / 128 blocks would not fill the GPU). Deterministic
/// too.
#[allow(clippy::too_many_arguments)]
pub fn flash_bwd_wgmma(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    causal: bool,
    scale: f64,
    split: Option<bool>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = q.dim(3)?;
    if !matches!(d, 64 | 80 | 128) || !hopper() {
        return Err(Error::msg(format!(
            "flash_bwd_wgmma: needs an sm_90 device and head dim 64, 80 or 128 (got {d})"
        )));
    }
    bwd(q, k, v, o, lse, g, causal, scale, None, Some(split), false)
}

/// Whether the Hopper backward's tensor maps can address these operands: 16-byte aligned
/// bases, and coordinates within i32 (`rows` = B · Hq · Tq query rows, `tk` keys).
fn wgmma_bwd_addressable(ts: &[&Tensor], rows: usize, tk: usize) -> Result<bool> {
    for t in ts {
        if t.cuda_ptr()? % 16 != 0 {
            return Ok(false);
        }
    }
    Ok(rows + 64 <= i32::MAX as usize && tk + 128 <= i32::MAX as usize)
}

/// `flash_bwd`; `wg`: every gradient through `grads_wgmma` with its `split`, or (`fallback`)
/// through the mma.sync kernels when its tensor maps cannot address the operands.
#[allow(clippy::too_many_arguments)]
fn bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    causal: bool,
    scale: f64,
    segments: Option<&Segments>,
    wg: Option<Option<bool>>,
    fallback: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, hq, tq, d) = (q.dim(0)?, q.dim(1)?, q.dim(2)?, q.dim(3)?);
    let (hkv, tk) = (k.dim(1)?, k.dim(2)?);
    if ![64, 80, 128].contains(&d)
        || o.shape() != q.shape()
        || g.shape() != q.shape()
        || k.shape() != v.shape()
        || k.rank() != 4
        || k.dim(0)? != b
        || k.dim(3)? != d
        || hkv == 0
        || hq % hkv != 0
    {
        return Err(Error::shape(
            "flash_bwd",
            format!(
                "q {:?} k {:?} v {:?} o {:?} g {:?} (head dim 64, 80 or 128; query heads a \
                 multiple of the key/value heads)",
                q.shape(),
                k.shape(),
                v.shape(),
                o.shape(),
                g.shape()
            ),
        ));
    }
    if [q, k, v, o, g].iter().any(|t| t.dtype() != DType::BF16) {
        return Err(Error::msg(format!(
            "flash_bwd: q, k, v, o and the gradient must be bf16, got {} {} {} {} {}",
            q.dtype(),
            k.dtype(),
            v.dtype(),
            o.dtype(),
            g.dtype()
        )));
    }
    let [klo, khi, qlo, qhi] = segment_ptrs(segments, "flash_bwd", tq, tk)?;
    let seg = if segments.is_some() { "seg_" } else { "" };
    let (q, k, v, o, g) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        o.contiguous()?,
        g.contiguous()?,
    );
    let dev = device()?;
    let rows = b * hq * tq;
    let delta = Tensor::empty_cuda(&[rows], DType::F32)?;
    let (op, gp, dp) = (o.cuda_ptr()?, g.cuda_ptr()?, delta.cuda_ptr()?);
    crate::backend::cuda::ops::attention::launch_delta(DType::BF16, gp, op, dp, rows, d)?;
    let lse = lse.contiguous()?;
    if let Some(split) = wg {
        let ts = [&q, &k, &v, &g, &lse, &delta];
        // grads_wgmma's own check, with lse / delta padded to rows of 64 queries.
        let padded_rows = b * hq * tq.next_multiple_of(64);
        if !fallback || wgmma_bwd_addressable(&ts, padded_rows, tk)? {
            return grads_wgmma(&q, &k, &v, &g, &lse, &delta, causal, scale, split);
        }
    }
    let (qp, kp, vp, lp) = (q.cuda_ptr()?, k.cuda_ptr()?, v.cuda_ptr()?, lse.cuda_ptr()?);
    let dq = Tensor::empty_cuda(q.shape(), DType::BF16)?;
    let dqp = dq.cuda_ptr()?;
    let dk = Tensor::empty_cuda(k.shape(), DType::BF16)?;
    let dv = Tensor::empty_cuda(v.shape(), DType::BF16)?;
    let [hq_, hkv_, tq_, tk_] = [hq, hkv, tq, tk].map(|x| x as i64);
    let (scale, causal) = (scale as f32, causal as i64);
    // Shared memory: 64 x (D + 8) bf16 tiles. dK/dV: K, V and two buffers of (Q, dO), plus two
    // buffers of 64 lse and 64 delta floats; dQ: Q, dO and two buffers of (K, V).
    let tile = (64 * (d + 8) * 2) as u32;
    let (dkp, dvp) = (dk.cuda_ptr()?, dv.cuda_ptr()?);
    dev.launch(
        "flash.cu",
        &format!("flash_bwd_dkdv_{seg}d{d}"),
        (tk.div_ceil(64) as u32, hkv as u32, b as u32),
        (128, 1, 1),
        6 * tile + 2 * 128 * 4,
        &[
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&gp),
            arg(&lp),
            arg(&dp),
            arg(&dkp),
            arg(&dvp),
            arg(&qlo),
            arg(&qhi),
            arg(&hq_),
            arg(&hkv_),
            arg(&tq_),
            arg(&tk_),
            arg(&scale),
            arg(&causal),
        ],
    )?;
    dev.launch(
        "flash.cu",
        &format!("flash_bwd_dq_{seg}d{d}"),
        (tq.div_ceil(64) as u32, hq as u32, b as u32),
        (128, 1, 1),
        6 * tile,
        &[
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&gp),
            arg(&lp),
            arg(&dp),
            arg(&dqp),
            arg(&klo),
            arg(&khi),
            arg(&hq_),
            arg(&hkv_),
            arg(&tq_),
            arg(&tk_),
            arg(&scale),
            arg(&causal),
        ],
    )?;
    Ok((dq, dk, dv))
}

/// (dq, dk, dv) by the Hopper kernels (`flash_bwd_dkdv_wg[_split]_[s3_]d*`, `flash_bwd_dq_wg_d*`),
/// from contiguous bf16 q, k, v, g and f32 lse, delta.
#[allow(clippy::too_many_arguments)]
fn grads_wgmma(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    causal: bool,
    scale: f64,
    split: Option<bool>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, hq, tq, d) = (q.dim(0)?, q.dim(1)?, q.dim(2)?, q.dim(3)?);
    let (hkv, tk) = (k.dim(1)?, k.dim(2)?);
    let zeros = |shape: &[usize]| Tensor::zeros_on(shape, DType::BF16, Device::Cuda);
    if b * hq * tq * d == 0 || tk == 0 {
        // No query, or no key to see: zero gradients.
        return Ok((zeros(q.shape())?, zeros(k.shape())?, zeros(v.shape())?));
    }
    let dk = Tensor::empty_cuda(k.shape(), DType::BF16)?;
    let dv = Tensor::empty_cuda(v.shape(), DType::BF16)?;
    if !wgmma_bwd_addressable(
        &[q, k, v, g, lse, delta],
        b * hq * tq.next_multiple_of(64),
        tk,
    )? {
        return Err(Error::msg(format!(
            "flash_bwd_wgmma: operands TMA cannot address (q {:?}, k {:?})",
            q.shape(),
            k.shape()
        )));
    }
    let dev = device()?;
    let sms = dev.sm_count.max(1) as usize;
    let key_blocks = tk.div_ceil(WG_BK);
    let group = hq / hkv;
    let split = split.unwrap_or(group > 1 && b * hkv * key_blocks < sms);
    let map3 = |t: &Tensor, heads: usize, len: usize, rows: u32| {
        head_map("flash_bwd_wgmma", t, b * heads, len, d, rows)
    };
    let map1 = |t: &Tensor| -> Result<_> {
        super::gemm_tc::encode_tma_f32_1d(t.cuda_ptr()?, t.numel() as u64, 64)
            .map_err(|r| tma_error("flash_bwd_wgmma", r, t))
    };
    // The dK/dV kernel's lse / delta rows padded to a multiple of 64 queries, so that each
    // 64-float box it loads starts aligned: the TMA unit faults (illegal instruction) on a box
    // that starts off a 16-byte boundary, as Tq = 37 did on an H200 (run 12).
    // TESSERA_FLASH_BWD_PAD=0: unpadded, for diagnosis.
    let pad = tq % 64 != 0 && BWD_PAD.get() != Some(0);
    let lstride = if pad { tq.next_multiple_of(64) } else { tq };
    let padded = |t: &Tensor| t.reshape(&[b * hq, tq])?.zero_pad(1, 0, lstride - tq);
    let (lse_rows, delta_rows) = if pad {
        (padded(lse)?, padded(delta)?)
    } else {
        (lse.clone(), delta.clone())
    };
    // K/V boxes of 128 rows serve both kernels; Q/dO boxes of 64 (dK/dV's query tiles) and 128
    // (dQ's query blocks).
    let maps = [
        map3(q, hq, tq, 64)?,
        map3(k, hkv, tk, WG_BK as u32)?,
        map3(v, hkv, tk, WG_BK as u32)?,
        map3(g, hq, tq, 64)?,
        map1(&lse_rows)?,
        map1(&delta_rows)?,
        map3(q, hq, tq, WG_BM as u32)?,
        map3(g, hq, tq, WG_BM as u32)?,
    ];
    // f32 partials per query head when split, summed into dk / dv afterwards.
    let parts = if split {
        let shape = [b, hq, tk, d];
        Some((
            Tensor::empty_cuda(&shape, DType::F32)?,
            Tensor::empty_cuda(&shape, DType::F32)?,
        ))
    } else {
        None
    };
    let (dkp, dvp) = match &parts {
        Some((pk, pv)) => (pk.cuda_ptr()?, pv.cuda_ptr()?),
        None => (dk.cuda_ptr()?, dv.cuda_ptr()?),
    };
    let [hq_, hkv_, tq_, tk_, lstride_] = [hq, hkv, tq, tk, lstride].map(|x| x as i64);
    let (scale, causal) = (scale as f32, causal as i64);
    // mbarriers, 1024-byte alignment, K and V, 2 or 3 stages of (Q, dO, lse, delta).
    let stages = wgmma_bwd_stages();
    let ld = wgmma_layout_d(d); // shared memory in the layout of 128 at D 80
    let stage = (2 * 64 * ld * 2 + 512).next_multiple_of(1024);
    let shared = (256 + 1024 + 2 * WG_BK * ld * 2 + stages * stage) as u32;
    let kernel = format!(
        "flash_bwd_dkdv_wg_{}{}d{d}",
        if split { "split_" } else { "" },
        if stages == 3 { "s3_" } else { "" }
    );
    dev.launch(
        "flash_sm90.cu",
        &kernel,
        (
            key_blocks as u32,
            if split { hq } else { hkv } as u32,
            b as u32,
        ),
        (384, 1, 1),
        shared,
        &[
            arg(&maps[0]),
            arg(&maps[1]),
            arg(&maps[2]),
            arg(&maps[3]),
            arg(&maps[4]),
            arg(&maps[5]),
            arg(&dkp),
            arg(&dvp),
            arg(&hq_),
            arg(&hkv_),
            arg(&tq_),
            arg(&tk_),
            arg(&scale),
            arg(&causal),
            arg(&lstride_),
        ],
    )?;
    if let Some((pk, pv)) = &parts {
        let inner = (tk * d) as i64;
        let total = (b * hkv * tk * d) as i64;
        let group = group as i64;
        let blocks = (total as usize / 4).div_ceil(256).min(sms * 8) as u32;
        for (part, out) in [(pk, &dk), (pv, &dv)] {
            let (pp, op) = (part.cuda_ptr()?, out.cuda_ptr()?);
            dev.launch(
                "flash_sm90.cu",
                "flash_dkdv_group_sum",
                (blocks, 1, 1),
                (256, 1, 1),
                0,
                &[arg(&pp), arg(&op), arg(&group), arg(&inner), arg(&total)],
            )?;
        }
    }
    let dq = Tensor::empty_cuda(q.shape(), DType::BF16)?;
    let (lp, dp, dqp) = (lse.cuda_ptr()?, delta.cuda_ptr()?, dq.cuda_ptr()?);
    // mbarriers, 1024-byte alignment, Q and dO, 2 stages of K and V (128-key tiles).
    let shared = (256 + 1024 + 2 * WG_BM * ld * 2 + 2 * 2 * WG_BK * ld * 2) as u32;
    dev.launch(
        "flash_sm90.cu",
        &format!("flash_bwd_dq_wg_d{d}"),
        (tq.div_ceil(WG_BM) as u32, hq as u32, b as u32),
        (384, 1, 1),
        shared,
        &[
            arg(&maps[6]),
            arg(&maps[1]),
            arg(&maps[2]),
            arg(&maps[7]),
            arg(&lp),
            arg(&dp),
            arg(&dqp),
            arg(&hq_),
            arg(&hkv_),
            arg(&tq_),
            arg(&tk_),
            arg(&scale),
            arg(&causal),
        ],
    )?;
    Ok((dq, dk, dv))
}

/// The TMA map of a contiguous bf16 [heads = B·H, len, D] operand of the Hopper kernels:
/// boxes of 64 (D, 128 bytes, swizzled) x `rows` x 1, zeros past `len`; `len` 0 (no keys) still
/// gets a legal map.
fn head_map(
    op: &str,
    t: &Tensor,
    heads: usize,
    len: usize,
    d: usize,
    rows: u32,
) -> Result<cudarc::driver::sys::CUtensorMap> {
    let len = len.max(1);
    let dims = [d as u64, len as u64, heads as u64];
    let strides = [(d * 2) as u64, (len * d * 2) as u64];
    super::gemm_tc::encode_tma_bf16(t.cuda_ptr()?, &dims, &strides, &[64, rows, 1])
        .map_err(|r| tma_error(op, r, t))
}

fn tma_error(op: &str, r: cudarc::driver::sys::CUresult, t: &Tensor) -> Error {
    Error::msg(format!(
        "{op}: cuTensorMapEncodeTiled failed ({r:?}) for {:?}",
        t.shape()
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn uniform_segments_are_found() {
        use super::uniform_len;
        assert_eq!(uniform_len(&[0, 1024, 2048, 3072, 4096]), Some(1024));
        assert_eq!(uniform_len(&[0, 64]), Some(64));
        assert_eq!(uniform_len(&[0, 64, 128, 130]), None);
        assert_eq!(uniform_len(&[0, 0, 0]), None);
        assert_eq!(uniform_len(&[0]), None);
        assert_eq!(uniform_len(&[]), None);
    }
}
