//! Fused losses on CUDA (kernels/loss.cu), never materialising the softmax: per row, the row's
//! log-sum-exp and the picked log-probability; the backward recomputes e^{x − lse} per element.
//!
//! Two entries per loss:
//! - `cross_entropy` / `log_prob_of`: targets validated on the host by `src/ops/loss.rs`
//!   (`Option<usize>` per row), uploaded as i64 (−1 = ignored).
//! - `cross_entropy_targets` / `log_prob_of_targets`: the targets tensor itself (i64 or u32,
//!   any device). Cuda targets go to the kernels as they are, without a host round trip (which
//!   would stall the GPU); the kernels apply `ignore_index`. Ids outside 0..V cannot be reported
//!   without a synchronisation: they give a NaN loss (cross_entropy: the mean; log_prob_of:
//!   that row) and NaN gradient rows.
//!
//! The mean of cross_entropy is taken on the device: `ce_mean` counts the rows that are not
//! ignored and keeps 1 / max(count, 1) on the device for the backward. On the warp path the
//! mean is fused into the same launch (`ce_warp_mean`: the last block sums the per-block
//! partials in a fixed order).
//!
//! Kernel choice (v a multiple of a 16-byte vector and 16-byte aligned logits: "vectorisable"):
//! rows of up to `WARP_MAX_V` = 8192 logits take `lse_pick_warp` (one warp per row, 8 rows per
//! block, batches of 16-byte loads, no block barrier); longer rows that fit in registers
//! (`RowVec`: up to 32768 bf16 / 16384 f32) `lse_pick_v{vpt}` (one block per row); longer
//! vectorisable rows (the 151936 vocabulary) `lse_pick_loop` (16-byte loads, one block per
//! row); anything else the scalar `lse_pick`. The backward uses `lse_pick_bwd_vec` (16-byte
//! loads and stores, 4 vectors per thread, at most 256 threads per block) when v and the
//! pointers allow, else `lse_pick_bwd`.
//!
//! The forward and backward are not fused into one pass writing dlogits: the upstream gradient
//! (and, for device targets, the count of rows that are not ignored) is only known on the
//! device at backward time, so dlogits written by the forward would need a second
//! read-scale-write pass: 4 passes over [rows, v] instead of 3.

use super::index::{device_ids, on_cuda, upload_i64, upstream};
use super::reduce::RowVec;
use crate::autograd::record;
use crate::backend::cuda::kernels::suffix;
use crate::backend::cuda::{arg, device};
use crate::{DType, Error, Result, Tensor};

/// Threads per block of the looping row kernels (vocabularies are long rows).
const ROW_THREADS: u32 = 512;
/// Most threads per block of lse_pick_bwd_vec (4 vectors each).
const BWD_THREADS: usize = 256;
/// Threads of the one-block ce_mean.
const MEAN_THREADS: u32 = 1024;
/// Longest row (in logits) of lse_pick_warp.
const WARP_MAX_V: usize = 8192;
/// Rows per block of lse_pick_warp (one warp each; its launch bounds assume 256 threads).
const WARP_ROWS: usize = 8;

fn row_grid(rows: usize, op: &str) -> Result<(u32, u32, u32)> {
    if rows > i32::MAX as usize {
        return Err(Error::msg(format!(
            "{op}: {rows} rows exceed the cuda grid"
        )));
    }
    Ok((rows as u32, 1, 1))
}

/// Targets on the device, as the kernels read them.
struct Targets {
    /// Contiguous cuda i64 or u32 tensor, one id per row.
    t: Tensor,
    /// Kernel-name tag of the id type: "i64" or "u32".
    tag: &'static str,
    /// The ignored id, when `has_ignore` is 1.
    ignore: i64,
    has_ignore: i64,
}

impl Targets {
    /// Host-validated targets (None = ignored), uploaded as i64 with −1 for ignored rows.
    fn from_host(targets: &[Option<usize>]) -> Result<Targets> {
        let t: Vec<i64> = targets.iter().map(|t| t.map_or(-1, |c| c as i64)).collect();
        Ok(Targets {
            t: upload_i64(&t, &[targets.len()])?,
            tag: "i64",
            ignore: -1,
            has_ignore: 1,
        })
    }

    fn rows(&self) -> usize {
        self.t.numel()
    }
}

/// Checks `logits` [..., V] against `targets` [...] like `src/ops/loss.rs` and returns the
/// contiguous detached logits and V.
fn logits_for(op: &'static str, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, usize)> {
    on_cuda(op, &[logits])?;
    let v = crate::ops::loss::vocab_of(op, logits, targets)?;
    suffix(logits.dtype(), op)?;
    Ok((logits.detach().contiguous()?, v))
}

/// Per row of the contiguous cuda logits `x` [rows, v]: (lse, x[t] − lse) in f32 (0 on ignored
/// rows, NaN on invalid ones).
fn lse_pick(x: &Tensor, v: usize, tg: &Targets) -> Result<(Tensor, Tensor)> {
    let rows = tg.rows();
    let dtype = x.dtype();
    let sfx = suffix(dtype, "cross_entropy")?;
    let lse = Tensor::empty_cuda(&[rows], DType::F32)?;
    let picked = Tensor::empty_cuda(&[rows], DType::F32)?;
    if rows == 0 {
        return Ok((lse, picked));
    }
    let (xp, tp, lp, pp) = (
        x.cuda_ptr()?,
        tg.t.cuda_ptr()?,
        lse.cuda_ptr()?,
        picked.cuda_ptr()?,
    );
    let (rows64, v64) = (rows as i64, v as i64);
    let args = [
        arg(&xp),
        arg(&tp),
        arg(&lp),
        arg(&pp),
        arg(&rows64),
        arg(&v64),
        arg(&tg.ignore),
        arg(&tg.has_ignore),
    ];
    let elem = dtype.size_in_bytes();
    let tag = tg.tag;
    let vectorisable = v > 0 && v.is_multiple_of(16 / elem) && xp.is_multiple_of(16);
    if warp_rows(v, elem, xp) {
        let blocks = rows.div_ceil(WARP_ROWS);
        let (grid, _, _) = row_grid(blocks, "cross_entropy")?;
        device()?.launch(
            "loss.cu",
            &format!("lse_pick_warp_{tag}_{sfx}"),
            (grid, 1, 1),
            (32, WARP_ROWS as u32, 1),
            0,
            &args,
        )?;
    } else if let Some(pl) = RowVec::plan(v, elem, 8, &[xp]) {
        let (grid, block) = pl.dims(rows, "cross_entropy")?;
        device()?.launch(
            "loss.cu",
            &format!("lse_pick_v{}_{tag}_{sfx}", pl.vpt),
            grid,
            block,
            0,
            &args,
        )?;
    } else {
        let kernel = if vectorisable {
            format!("lse_pick_loop_{tag}_{sfx}")
        } else {
            format!("lse_pick_{tag}_{sfx}")
        };
        device()?.launch(
            "loss.cu",
            &kernel,
            row_grid(rows, "cross_entropy")?,
            (ROW_THREADS, 1, 1),
            0,
            &args,
        )?;
    }
    Ok((lse, picked))
}

/// dx = (softmax(x) − onehot(t)) · g_r · scale · inv per row (0 on ignored rows, NaN on
/// invalid ones); inv = `inv_count[0]` (a device f32) or 1.
#[allow(clippy::too_many_arguments)]
fn lse_pick_backward(
    x: &Tensor,
    tg: &Targets,
    lse: &Tensor,
    inv_count: Option<&Tensor>,
    g: &Tensor,
    v: usize,
    scale: f32,
    g_per_row: bool,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let sfx = suffix(dtype, "cross_entropy_backward")?;
    // The kernels read the upstream gradient in f32 (an f32 loss of bf16 logits stays exact).
    let g = upstream(g, DType::F32)?;
    let dx = Tensor::empty_cuda(x.shape(), dtype)?;
    let rows = tg.rows();
    if rows == 0 || v == 0 {
        return Ok(dx);
    }
    let (xp, tp, lp, gp, dp) = (
        x.cuda_ptr()?,
        tg.t.cuda_ptr()?,
        lse.cuda_ptr()?,
        g.cuda_ptr()?,
        dx.cuda_ptr()?,
    );
    let ip: u64 = match inv_count {
        Some(t) => t.cuda_ptr()?,
        None => 0,
    };
    let (v64, gpr) = (v as i64, g_per_row as i64);
    let args = [
        arg(&xp),
        arg(&tp),
        arg(&lp),
        arg(&gp),
        arg(&ip),
        arg(&dp),
        arg(&v64),
        arg(&tg.ignore),
        arg(&tg.has_ignore),
        arg(&scale),
        arg(&gpr),
    ];
    let tag = tg.tag;
    let per = 16 / dtype.size_in_bytes();
    // Enough threads (a multiple of 32, at most BWD_THREADS) for 4 vectors each: a row of
    // 4096 bf16 is one block of 128 threads, no idle loop iterations.
    let threads = ((v / per).div_ceil(4).div_ceil(32) * 32).clamp(32, BWD_THREADS);
    let col_blocks = (v / per).div_ceil(4 * threads);
    if v.is_multiple_of(per)
        && xp.is_multiple_of(16)
        && dp.is_multiple_of(16)
        && col_blocks <= 65535
    {
        let (gx, _, _) = row_grid(rows, "cross_entropy_backward")?;
        device()?.launch(
            "loss.cu",
            &format!("lse_pick_bwd_vec_{tag}_{sfx}"),
            (gx, col_blocks as u32, 1),
            (threads as u32, 1, 1),
            0,
            &args,
        )?;
    } else {
        device()?.launch(
            "loss.cu",
            &format!("lse_pick_bwd_{tag}_{sfx}"),
            row_grid(rows, "cross_entropy_backward")?,
            (ROW_THREADS, 1, 1),
            0,
            &args,
        )?;
    }
    Ok(dx)
}

/// Whether rows of `v` logits of `elem` bytes at `xp` take the warp-per-row kernels
/// (lse_pick_warp, ce_warp_mean): 16-byte vectors, at most `WARP_MAX_V` logits.
fn warp_rows(v: usize, elem: usize, xp: u64) -> bool {
    v > 0 && v <= WARP_MAX_V && v.is_multiple_of(16 / elem) && xp.is_multiple_of(16)
}

/// The cross-entropy forward's experimental variants (`ce_stage{S}_mean`, on the forward's
/// bandwidth): 2 or 3 batches in flight, staged through shared memory by cp.async; 1, the
/// default kernel with the next batch prefetched into L2; 4, the default kernel with batches
/// twice as long (a row of 4096 bf16 logits in one batch: one DRAM latency a row, half the
/// warps per SM); 5, rows streamed into shared memory by the bulk-copy engine with two rows in
/// flight a warp (`ce_bulk_mean`, sm_90, rows of at most 8 KB); 6, the same with one row in
/// flight a warp and 3 blocks an SM (`ce_bulk2_mean`); 7, the default kernel with a quarter of
/// the exponentials by a polynomial on the FMA pipe instead of MUFU.EX2 (`poly_exp2`,
/// FlashAttention-4's trick); 8, 5 with 7's exponentials (`ce_bulk_poly_mean`); 0 for the
/// default (`ce_warp_mean`, batches of 8 vectors a lane in registers). `TESSERA_CE_STAGES`, or
/// `set_ce_stages`.
pub fn ce_stages() -> usize {
    match CE_STAGES.get() {
        Some(s @ (1..=8)) => s as usize,
        _ => 0,
    }
}

/// Overrides `TESSERA_CE_STAGES` for this process (0 to 8; `None`: the environment again).
pub fn set_ce_stages(stages: Option<usize>) -> Result<()> {
    match stages {
        None | Some(0..=8) => {
            CE_STAGES.set(stages.map(|s| s as u8));
            Ok(())
        }
        Some(s) => Err(Error::msg(format!(
            "cross_entropy: {s} stages (want 0 to 8)"
        ))),
    }
}

static CE_STAGES: crate::backend::cuda::Switch =
    crate::backend::cuda::Switch::new("TESSERA_CE_STAGES");

/// The bulk kernels' warps per block and row buffer bytes (CE_BULK_WARPS, CE_BULK_ROW in
/// kernels/loss.cu): dynamic shared memory 128 + warps · stages · row bytes.
const CE_BULK_WARPS: usize = 4;
const CE_BULK_ROW: usize = 8192;

/// Bytes of one lane's batch of ce_warp_mean: CE_WARP_U (8) 16-byte vectors.
const CE_BATCH_BYTES: usize = 8 * 16;

/// Device address of ce_warp_mean's block counter: one u32, zero between launches (the last
/// block of each launch resets it). Allocated zeroed once and kept for the process.
fn done_counter() -> Result<u64> {
    static DONE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(&p) = DONE.get() {
        return Ok(p);
    }
    let t = Tensor::zeros_on(&[1], DType::F32, crate::Device::Cuda)?;
    let p = t.cuda_ptr()?;
    // Kept alive for the process: its address is the counter.
    std::mem::forget(t);
    Ok(*DONE.get_or_init(|| p))
}

/// Mean cross-entropy of the contiguous detached cuda logits `x` [rows, v] against `tg`,
/// recorded for `input`: a scalar of the logits' dtype, or f32 when `f32_out` (the kernels
/// compute it in f32 either way).
fn cross_entropy_dev(
    input: &Tensor,
    x: Tensor,
    v: usize,
    tg: Targets,
    f32_out: bool,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let sfx = suffix(dtype, "cross_entropy")?;
    let rows = tg.rows();
    let xp = x.cuda_ptr()?;
    let out = Tensor::empty_cuda(&[], DType::F32)?;
    let inv_count = Tensor::empty_cuda(&[1], DType::F32)?;
    let (tp, op, ip) = (tg.t.cuda_ptr()?, out.cuda_ptr()?, inv_count.cuda_ptr()?);
    let rows64 = rows as i64;
    let lse = if rows > 0 && rows < (1 << 24) && warp_rows(v, dtype.size_in_bytes(), xp) {
        // lse_pick_warp with the mean fused in: one launch.
        let lse = Tensor::empty_cuda(&[rows], DType::F32)?;
        let picked = Tensor::empty_cuda(&[rows], DType::F32)?;
        let dev = device()?;
        // `TESSERA_CE_STAGES=5`, `6`, `8` (ce_bulk_mean, ce_bulk2_mean, ce_bulk_poly_mean):
        // persistent warps, on sm_90 for rows of at most CE_BULK_ROW bytes; elsewhere the
        // default kernel.
        let stages = match ce_stages() {
            5 | 6 | 8 if dev.cc != (9, 0) || v * dtype.size_in_bytes() > CE_BULK_ROW => 0,
            st => st,
        };
        // The bulk kernels: (kernel, stage buffers a warp, blocks an SM); 3 stages keep two rows
        // ahead a warp, 2 stages one.
        let bulk = match stages {
            5 => Some(("ce_bulk", 3, 2)),
            6 => Some(("ce_bulk2", 2, 3)),
            8 => Some(("ce_bulk_poly", 3, 2)),
            _ => None,
        };
        let (blocks, block_rows) = match bulk {
            Some((_, _, per_sm)) => {
                let sms = dev.sm_count.max(1) as usize;
                let blocks = (per_sm * sms).min(rows.div_ceil(CE_BULK_WARPS));
                (blocks, CE_BULK_WARPS)
            }
            None => (rows.div_ceil(WARP_ROWS), WARP_ROWS),
        };
        let partial = Tensor::empty_cuda(&[2 * blocks], DType::F32)?;
        let (lp, pp, qp, done) = (
            lse.cuda_ptr()?,
            picked.cuda_ptr()?,
            partial.cuda_ptr()?,
            done_counter()?,
        );
        let v64 = v as i64;
        let (grid, _, _) = row_grid(blocks, "cross_entropy")?;
        let (name, shared) = match (stages, bulk) {
            (_, Some((kernel, st, _))) => (
                format!("{kernel}_mean_{}_{sfx}", tg.tag),
                (128 + CE_BULK_WARPS * st * CE_BULK_ROW) as u32,
            ),
            (0, _) => (format!("ce_warp_mean_{}_{sfx}", tg.tag), 0),
            (st @ (1 | 4 | 7), _) => (format!("ce_stage{st}_mean_{}_{sfx}", tg.tag), 0),
            (st, _) => (
                format!("ce_stage{st}_mean_{}_{sfx}", tg.tag),
                (WARP_ROWS * st * 32 * CE_BATCH_BYTES) as u32,
            ),
        };
        dev.launch(
            "loss.cu",
            &name,
            (grid, 1, 1),
            (32, block_rows as u32, 1),
            shared,
            &[
                arg(&xp),
                arg(&tp),
                arg(&lp),
                arg(&pp),
                arg(&rows64),
                arg(&v64),
                arg(&tg.ignore),
                arg(&tg.has_ignore),
                arg(&qp),
                arg(&done),
                arg(&op),
                arg(&ip),
            ],
        )?;
        lse
    } else {
        let (lse, picked) = lse_pick(&x, v, &tg)?;
        let pp = picked.cuda_ptr()?;
        // Launched for zero rows too: it writes the loss 0 and inv 1.
        device()?.launch(
            "loss.cu",
            &format!("ce_mean_{}_{sfx}", tg.tag),
            (1, 1, 1),
            (MEAN_THREADS, 1, 1),
            0,
            &[
                arg(&pp),
                arg(&tp),
                arg(&op),
                arg(&ip),
                arg(&rows64),
                arg(&tg.ignore),
                arg(&tg.has_ignore),
            ],
        )?;
        lse
    };
    let out = if f32_out || dtype == DType::F32 {
        out
    } else {
        super::cast(&out, dtype)?
    };
    Ok(record("cross_entropy", out, &[input], move |g| {
        Ok(vec![Some(lse_pick_backward(
            &x,
            &tg,
            &lse,
            Some(&inv_count),
            g,
            v,
            1.0,
            false,
        )?)])
    }))
}

/// log softmax(x)[id] per row of the contiguous detached cuda logits `x`, shaped `ids_shape`.
fn log_prob_of_dev(
    input: &Tensor,
    x: Tensor,
    v: usize,
    tg: Targets,
    ids_shape: &[usize],
) -> Result<Tensor> {
    let dtype = x.dtype();
    suffix(dtype, "log_prob_of")?;
    let (lse, picked) = lse_pick(&x, v, &tg)?;
    let picked = if dtype == DType::F32 {
        picked
    } else {
        super::cast(&picked, dtype)?
    };
    let out = picked.reshape(ids_shape)?;
    Ok(record("log_prob_of", out, &[input], move |g| {
        Ok(vec![Some(lse_pick_backward(
            &x, &tg, &lse, None, g, v, -1.0, true,
        )?)])
    }))
}

/// Mean cross-entropy for the contiguous detached cuda logits `x` [..., v] of `input` (the
/// tensor to record the gradient for) and targets validated on the host (None = ignore_index).
/// The result is f32 when `f32_out`, else of the logits' dtype.
pub fn cross_entropy(
    input: &Tensor,
    x: Tensor,
    v: usize,
    targets: &[Option<usize>],
    f32_out: bool,
) -> Result<Tensor> {
    suffix(x.dtype(), "cross_entropy")?;
    cross_entropy_dev(input, x, v, Targets::from_host(targets)?, f32_out)
}

/// log softmax(x)[id] per row, shaped like `ids_shape` (= the logits' leading dims), for ids
/// validated on the host.
pub fn log_prob_of(
    input: &Tensor,
    x: Tensor,
    v: usize,
    ids: &[usize],
    ids_shape: &[usize],
) -> Result<Tensor> {
    suffix(x.dtype(), "log_prob_of")?;
    let targets: Vec<Option<usize>> = ids.iter().map(|&c| Some(c)).collect();
    log_prob_of_dev(input, x, v, Targets::from_host(&targets)?, ids_shape)
}

/// `logits.cross_entropy(targets, ignore_index)` for cuda logits [..., V] and i64 / u32
/// targets [...] on any device, read by the kernels without a host round trip when they are
/// on cuda. Ids outside 0..V (other than `ignore_index`) make the loss NaN instead of an error.
/// The result is f32 when `f32_out`, else of the logits' dtype.
pub fn cross_entropy_targets(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    f32_out: bool,
) -> Result<Tensor> {
    let (x, v) = logits_for("cross_entropy", logits, targets)?;
    let (t, tag) = device_ids(targets, "cross_entropy")?;
    let tg = Targets {
        t,
        tag,
        ignore: ignore_index,
        has_ignore: 1,
    };
    cross_entropy_dev(logits, x, v, tg, f32_out)
}

/// `logits.log_prob_of(ids)` for cuda logits [..., V] and i64 / u32 ids [...] on any device,
/// read by the kernels without a host round trip when they are on cuda. Ids outside 0..V give
/// NaN for their rows instead of an error.
pub fn log_prob_of_targets(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (x, v) = logits_for("log_prob_of", logits, ids)?;
    let (t, tag) = device_ids(ids, "log_prob_of")?;
    let tg = Targets {
        t,
        tag,
        ignore: 0,
        has_ignore: 0,
    };
    let shape = ids.shape().to_vec();
    log_prob_of_dev(logits, x, v, tg, &shape)
}
