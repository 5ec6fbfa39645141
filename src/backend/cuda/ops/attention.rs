//! CUDA scaled-dot-product attention (kernels/attention.cu): a flash-style forward (online
//! softmax in f32, saves lse [B, Hq, Tq] f32) and a backward that recomputes P from q, k and
//! lse: delta = rowsum(dO ∘ O), then dK/dV per (b, kv head, key tile) summing the GQA group
//! (deterministic), then dQ per (b, head, query tile).
//!
//! Masks travel as device arrays: key padding as f32 0/1 [B, Tk]; cu_seqlens as the key range
//! [seg_lo[i], seg_hi[i]) of each token's segment (i64 [T]), which also lets the kernels skip
//! whole tiles outside a segment. q, k, v are read through their (b, h, t) strides (a
//! transposed [B, T, H, D] view needs no copy) as long as the head dim has unit stride.
//!
//! bf16 calls with equal head dims of 64, 80 or 128 and no key padding go to the tensor-core
//! flash kernels instead (src/backend/cuda/flash.rs), cu_seqlens segments included.

use super::{arg, device};
use crate::autograd::record;
use crate::backend::cuda::flash::{self, Segments};
use crate::backend::cuda::kernels::suffix;
use crate::{DType, Device, Error, Result, Tensor};

const BQ: usize = 16;
const BK: usize = 32;
const THREADS: u32 = 128;
const WARPS: usize = 4;
/// Largest head dim the kernels hold (32 lanes x 8 columns).
pub const MAX_HEAD_DIM: usize = 256;

/// `struct AttnShape` of kernels/attention.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct AttnShape {
    b: i64,
    hq: i64,
    hkv: i64,
    tq: i64,
    tk: i64,
    d: i64,
    dv: i64,
    q_sb: i64,
    q_sh: i64,
    q_st: i64,
    k_sb: i64,
    k_sh: i64,
    k_st: i64,
    v_sb: i64,
    v_sh: i64,
    v_st: i64,
    causal: i64,
}

/// Options of one attention call, already validated by the CPU op's checks.
pub struct AttnParams<'a> {
    pub causal: bool,
    pub scale: f64,
    /// [B * Tk], true where the key is a real token.
    pub key_padding: Option<&'a [bool]>,
    /// Segment boundaries [0, t1, ..., T] (Tq == Tk).
    pub cu_seqlens: Option<&'a [usize]>,
}

/// Device-side masks (kept alive by the backward closure).
struct Masks {
    kpad: Option<Tensor>,
    seg_lo: Option<Tensor>,
    seg_hi: Option<Tensor>,
}

impl Masks {
    fn ptrs(&self) -> Result<(u64, u64, u64)> {
        let p = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0u64), |t| t.cuda_ptr());
        Ok((p(&self.kpad)?, p(&self.seg_lo)?, p(&self.seg_hi)?))
    }
}

/// A view whose last dim has unit stride (a copy otherwise).
fn unit_last(t: &Tensor) -> Result<Tensor> {
    let t = t.detach();
    if t.shape()[3] > 1 && t.layout().strides[3] != 1 {
        t.contiguous()
    } else {
        Ok(t)
    }
}

fn shape_of(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> AttnShape {
    let st = |t: &Tensor, i: usize| t.layout().strides[i] as i64;
    AttnShape {
        b: q.shape()[0] as i64,
        hq: q.shape()[1] as i64,
        hkv: k.shape()[1] as i64,
        tq: q.shape()[2] as i64,
        tk: k.shape()[2] as i64,
        d: q.shape()[3] as i64,
        dv: v.shape()[3] as i64,
        q_sb: st(q, 0),
        q_sh: st(q, 1),
        q_st: st(q, 2),
        k_sb: st(k, 0),
        k_sh: st(k, 1),
        k_st: st(k, 2),
        v_sb: st(v, 0),
        v_sh: st(v, 1),
        v_st: st(v, 2),
        causal: causal as i64,
    }
}

/// Whether the tensor-core flash kernels take this call: bf16, no key padding, equal head
/// dims of 64, 80 or 128 (segments and causal either way). `TESSERA_ATTENTION=simple` forces
/// the SIMT kernels (benchmarks, A/B checks).
fn flash_applies(dtype: DType, d: usize, dv: usize, p: &AttnParams) -> bool {
    dtype == DType::BF16
        && p.key_padding.is_none()
        && d == dv
        && matches!(d, 64 | 80 | 128)
        && std::env::var("TESSERA_ATTENTION").map_or(true, |v| v != "simple")
}

/// delta[row] = Σ_e dO[row, e] · O[row, e] over `rows` contiguous rows of `dv` values (f32
/// out): the row term of every attention backward (this SIMT one and the flash one).
pub(crate) fn launch_delta(
    dtype: DType,
    dout: u64,
    out: u64,
    delta: u64,
    rows: usize,
    dv: usize,
) -> Result<()> {
    let sfx = suffix(dtype, "attention backward")?;
    let (rows64, dv64) = (rows as i64, dv as i64);
    device()?.launch(
        "attention.cu",
        &format!("attn_bwd_delta_{sfx}"),
        (rows.div_ceil(WARPS) as u32, 1, 1),
        (THREADS, 1, 1),
        0,
        &[arg(&dout), arg(&out), arg(&delta), arg(&rows64), arg(&dv64)],
    )
}

fn floats_bytes(n: usize) -> u32 {
    (n * std::mem::size_of::<f32>()) as u32
}

/// Attention of device tensors q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv]
/// (shapes validated by the caller), with the CPU op's semantics and backward.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<Tensor> {
    if !(q.is_cuda() && k.is_cuda() && v.is_cuda()) {
        return Err(Error::msg(format!(
            "attention: q, k, v must be on the same device, got {:?}, {:?}, {:?}",
            q.device(),
            k.device(),
            v.device()
        )));
    }
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        return Err(Error::msg(format!(
            "attention: dtype mismatch {} / {} / {}",
            dtype,
            k.dtype(),
            v.dtype()
        )));
    }
    let sfx = suffix(dtype, "attention")?;
    let (d, dv) = (q.shape()[3], v.shape()[3]);
    if d > MAX_HEAD_DIM || dv > MAX_HEAD_DIM {
        return Err(Error::shape(
            "attention",
            format!("cuda supports head dims up to {MAX_HEAD_DIM}, got {d} / {dv}"),
        ));
    }
    if q.shape()[1] > u16::MAX as usize
        || q.shape()[0] > u16::MAX as usize
        || k.shape()[1] > u16::MAX as usize
    {
        return Err(Error::shape(
            "attention",
            format!(
                "cuda supports at most 65535 batches and heads, got {:?}",
                q.shape()
            ),
        ));
    }
    let (qc, kc, vc) = (unit_last(q)?, unit_last(k)?, unit_last(v)?);
    let s = shape_of(&qc, &kc, &vc, p.causal);
    let (b, hq, tq, tk) = (q.shape()[0], q.shape()[1], q.shape()[2], k.shape()[2]);
    let use_flash = flash_applies(dtype, d, dv, p);
    let flash_segments = match (use_flash, p.cu_seqlens) {
        // (An empty sequence launches nothing, so needs no arrays.)
        (true, Some(cu)) if tq > 0 => Some(Segments::from_cu_seqlens(cu)?),
        _ => None,
    };

    // The SIMT kernels' masks (none when flash takes the call: no padding, own segments).
    let masks = crate::no_grad(|| -> Result<Masks> {
        let kpad = match p.key_padding {
            Some(m) => {
                let f: Vec<f32> = m.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect();
                Some(Tensor::from_vec(f, &[m.len()])?.to_device(Device::Cuda)?)
            }
            None => None,
        };
        let (seg_lo, seg_hi) = match p.cu_seqlens {
            Some(cu) if !use_flash => {
                let (mut lo, mut hi) = (vec![0i64; tq], vec![0i64; tq]);
                for w in cu.windows(2) {
                    for i in w[0]..w[1] {
                        lo[i] = w[0] as i64;
                        hi[i] = w[1] as i64;
                    }
                }
                (
                    Some(Tensor::from_vec(lo, &[tq])?.to_device(Device::Cuda)?),
                    Some(Tensor::from_vec(hi, &[tq])?.to_device(Device::Cuda)?),
                )
            }
            _ => (None, None),
        };
        Ok(Masks {
            kpad,
            seg_lo,
            seg_hi,
        })
    })?;
    let (kpad_p, lo_p, hi_p) = masks.ptrs()?;

    let scale = p.scale as f32;
    let (ldk, ldv) = (d | 1, dv | 1);
    let (causal, scale64) = (p.causal, p.scale);
    let (out, lse) = if use_flash {
        // Tensor-core forward (kernels/flash.cu); same lse convention (natural log of the
        // row's Σ exp(scaled score), -inf for a row that sees no key) as attn_fwd.
        flash::flash_fwd_segments(&qc, &kc, &vc, p.causal, p.scale, flash_segments.as_ref())?
    } else {
        let out = Tensor::empty_cuda(&[b, hq, tq, dv], dtype)?;
        let lse = Tensor::empty_cuda(&[b, hq, tq], DType::F32)?;
        let dev = device()?;
        let (qp, kp, vp, op, lp) = (
            qc.cuda_ptr()?,
            kc.cuda_ptr()?,
            vc.cuda_ptr()?,
            out.cuda_ptr()?,
            lse.cuda_ptr()?,
        );
        dev.launch(
            "attention.cu",
            &format!("attn_fwd_{sfx}"),
            (tq.div_ceil(BQ) as u32, hq as u32, b as u32),
            (THREADS, 1, 1),
            floats_bytes(BQ * ldk + BK * ldk + BK * ldv),
            &[
                arg(&qp),
                arg(&kp),
                arg(&vp),
                arg(&op),
                arg(&lp),
                arg(&kpad_p),
                arg(&lo_p),
                arg(&hi_p),
                arg(&s),
                arg(&scale),
            ],
        )?;
        (out, lse)
    };

    if !crate::autograd::needs_grad(&[q, k, v]) {
        return Ok(out);
    }
    let saved_out = out.clone();
    Ok(record("attention", out, &[q, k, v], move |g| {
        let g = g.contiguous()?;
        if use_flash {
            let (dq, dk, dv) = flash::flash_bwd(
                &qc,
                &kc,
                &vc,
                &saved_out,
                &lse,
                &g,
                causal,
                scale64,
                flash_segments.as_ref(),
            )?;
            return Ok(vec![Some(dq), Some(dk), Some(dv)]);
        }
        let hkv = kc.shape()[1];
        let dq = Tensor::empty_cuda(qc.shape(), dtype)?;
        let dk = Tensor::empty_cuda(kc.shape(), dtype)?;
        let dvt = Tensor::empty_cuda(vc.shape(), dtype)?;
        let rows = b * hq * tq;
        let delta = Tensor::empty_cuda(&[rows], DType::F32)?;
        let dev = device()?;
        let (qp, kp, vp) = (qc.cuda_ptr()?, kc.cuda_ptr()?, vc.cuda_ptr()?);
        let (gp, op, lp, dp) = (
            g.cuda_ptr()?,
            saved_out.cuda_ptr()?,
            lse.cuda_ptr()?,
            delta.cuda_ptr()?,
        );
        let (dqp, dkp, dvp) = (dq.cuda_ptr()?, dk.cuda_ptr()?, dvt.cuda_ptr()?);
        let (kpad_p, lo_p, hi_p) = masks.ptrs()?;
        launch_delta(dtype, gp, op, dp, rows, dv)?;
        dev.launch(
            "attention.cu",
            &format!("attn_bwd_dkdv_{sfx}"),
            (tk.div_ceil(BK) as u32, hkv as u32, b as u32),
            (THREADS, 1, 1),
            floats_bytes((BK + BQ) * (ldk + ldv) + 2 * BQ * (BK + 1) + 2 * BQ),
            &[
                arg(&qp),
                arg(&kp),
                arg(&vp),
                arg(&gp),
                arg(&lp),
                arg(&dp),
                arg(&dkp),
                arg(&dvp),
                arg(&kpad_p),
                arg(&lo_p),
                arg(&hi_p),
                arg(&s),
                arg(&scale),
            ],
        )?;
        dev.launch(
            "attention.cu",
            &format!("attn_bwd_dq_{sfx}"),
            (tq.div_ceil(BQ) as u32, hq as u32, b as u32),
            (THREADS, 1, 1),
            floats_bytes((BQ + BK) * (ldk + ldv) + 2 * BQ),
            &[
                arg(&qp),
                arg(&kp),
                arg(&vp),
                arg(&gp),
                arg(&lp),
                arg(&dp),
                arg(&dqp),
                arg(&kpad_p),
                arg(&lo_p),
                arg(&hi_p),
                arg(&s),
                arg(&scale),
            ],
        )?;
        Ok(vec![Some(dq), Some(dk), Some(dvt)])
    }))
}
