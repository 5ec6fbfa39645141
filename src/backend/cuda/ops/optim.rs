//! CUDA optimiser kernels (kernels/optim.cu): fused AdamW and SGD steps on f32 parameters
//! (in place, same arithmetic as the CPU path), and the global gradient norm / scaling of
//! `clip_grad_norm` (two-pass f64 sum of squares, deterministic).

use super::{arg, device, grid_for, THREADS};
use crate::backend::cuda::kernels::suffix;
use crate::{DType, Error, Result, Tensor};

/// Scalars of one AdamW update, already rounded to f32 by the caller.
#[derive(Debug, Clone, Copy)]
pub struct AdamWCoefs {
    pub decay: Option<f32>,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub neg_step_size: f32,
}

fn check_state(op: &'static str, p: &Tensor, others: &[(&str, &Tensor)]) -> Result<()> {
    if !p.is_cuda() || p.dtype() != DType::F32 || !p.is_contiguous() {
        return Err(Error::msg(format!(
            "{op}: cuda parameters must be contiguous f32 tensors, got {:?} {} on {:?}",
            p.shape(),
            p.dtype(),
            p.device()
        )));
    }
    for (what, t) in others {
        check_like(op, p, what, t, DType::F32)?;
    }
    Ok(())
}

/// `t` (`what`) must be a contiguous `dtype` cuda tensor of as many elements as `p`.
fn check_like(op: &'static str, p: &Tensor, what: &str, t: &Tensor, dtype: DType) -> Result<()> {
    if !t.is_cuda() || t.dtype() != dtype || !t.is_contiguous() || t.numel() != p.numel() {
        return Err(Error::msg(format!(
            "{op}: {what} must be a contiguous {dtype} cuda tensor of {} elements like its \
             parameter, got {:?} {} on {:?}",
            p.numel(),
            t.shape(),
            t.dtype(),
            t.device()
        )));
    }
    Ok(())
}

/// Checks one AdamW update's tensors (all contiguous f32 on CUDA, except that the gradient may
/// be bf16, and the compute copy, if any, must be bf16); returns the copy's pointer (0: none).
fn check_adamw(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    copy: Option<&Tensor>,
) -> Result<u64> {
    check_state("AdamW::step", p, &[("exp_avg", m), ("exp_avg_sq", v)])?;
    let g_dtype = if g.dtype() == DType::BF16 {
        DType::BF16
    } else {
        DType::F32
    };
    check_like("AdamW::step", p, "gradient", g, g_dtype)?;
    match copy {
        Some(c) if c.dtype() == DType::BF16 && c.shape() == p.shape() && c.is_contiguous() => {
            c.cuda_ptr()
        }
        Some(c) => Err(Error::msg(format!(
            "AdamW::step: the compute copy of a {:?} parameter must be a contiguous bf16 \
             tensor of its shape, got {:?} {}",
            p.shape(),
            c.shape(),
            c.dtype()
        ))),
        None => Ok(0u64),
    }
}

/// One fused AdamW update of `p` in place (m and v updated too). All contiguous f32 on CUDA,
/// except that the gradient may be bf16 (a compute copy's, converted as it is read).
pub fn adamw_step(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &AdamWCoefs,
    copy: Option<&Tensor>,
) -> Result<()> {
    let cp = check_adamw(p, g, m, v, copy)?;
    let n = p.numel();
    if n == 0 {
        return Ok(());
    }
    let kernel = match g.dtype() {
        DType::BF16 => "adamw_f32_gbf16",
        _ => "adamw_f32",
    };
    let (pp, gp, mp, vp) = (p.cuda_ptr()?, g.cuda_ptr()?, m.cuda_ptr()?, v.cuda_ptr()?);
    let n64 = n as i64;
    let has_decay = k.decay.is_some() as i64;
    let decay = k.decay.unwrap_or(1.0);
    device()?.launch(
        "optim.cu",
        kernel,
        (grid_for(n), 1, 1),
        (THREADS as u32, 1, 1),
        0,
        &[
            arg(&pp),
            arg(&gp),
            arg(&mp),
            arg(&vp),
            arg(&n64),
            arg(&has_decay),
            arg(&decay),
            arg(&k.one_minus_beta1),
            arg(&k.beta2),
            arg(&k.one_minus_beta2),
            arg(&k.bc2_sqrt),
            arg(&k.eps),
            arg(&k.neg_step_size),
            arg(&cp),
        ],
    )
}

/// One tensor of a multi-tensor AdamW update ([`adamw_multi`]): the tensors and scalars
/// [`adamw_step`] takes.
pub struct AdamWUpdate {
    pub p: Tensor,
    pub g: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    pub copy: Option<Tensor>,
    pub k: AdamWCoefs,
}

/// One entry of the kernel's table (`AdamWTensor` in kernels/optim.cu, 72 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamWTensor {
    p: u64,
    g: u64,
    m: u64,
    v: u64,
    copy: u64,
    n: i64,
    first_block: i64,
    decay: f32,
    neg_step: f32,
    bc2_sqrt: f32,
    flags: i32,
}

/// Elements per block of `adamw_multi_f32` (ADAMW_MULTI_ELEMS in kernels/optim.cu).
const ADAMW_MULTI_ELEMS: usize = 8192;

/// Every update of `updates` in one launch (`adamw_multi_f32`): a table of the tensors goes
/// to the device through the staging ring, and each block finds its tensor in it. The same
/// arithmetic per element as [`adamw_step`], so the same results bit for bit, without a
/// launch per parameter. The betas and eps must be the same for all (one optimiser's).
pub fn adamw_multi(updates: &[AdamWUpdate]) -> Result<()> {
    let mut table = Vec::with_capacity(updates.len());
    let mut blocks = 0usize;
    // The betas and eps every update must share (one optimiser's).
    let Some(k) = updates.first().map(|u| u.k) else {
        return Ok(());
    };
    let same = |a: f32, b: f32| a.to_bits() == b.to_bits();
    for u in updates {
        let cp = check_adamw(&u.p, &u.g, &u.m, &u.v, u.copy.as_ref())?;
        if !(same(u.k.one_minus_beta1, k.one_minus_beta1)
            && same(u.k.beta2, k.beta2)
            && same(u.k.one_minus_beta2, k.one_minus_beta2)
            && same(u.k.eps, k.eps))
        {
            return Err(Error::msg(
                "adamw_multi: every tensor must share the betas and eps of one optimiser",
            ));
        }
        let n = u.p.numel();
        if n == 0 {
            continue;
        }
        table.push(AdamWTensor {
            p: u.p.cuda_ptr()?,
            g: u.g.cuda_ptr()?,
            m: u.m.cuda_ptr()?,
            v: u.v.cuda_ptr()?,
            copy: cp,
            n: n as i64,
            first_block: blocks as i64,
            decay: u.k.decay.unwrap_or(1.0),
            neg_step: u.k.neg_step_size,
            bc2_sqrt: u.k.bc2_sqrt,
            flags: u.k.decay.is_some() as i32 | (((u.g.dtype() == DType::BF16) as i32) << 1),
        });
        blocks += n.div_ceil(ADAMW_MULTI_ELEMS);
    }
    if table.is_empty() {
        return Ok(());
    }
    if blocks > i32::MAX as usize {
        return Err(Error::msg(format!(
            "adamw_multi: {blocks} blocks exceed one launch's grid"
        )));
    }
    let dev = device()?;
    let bytes = std::mem::size_of_val(table.as_slice());
    let on_device = Tensor::empty_cuda(&[bytes.div_ceil(8)], DType::I64)?;
    let tp = on_device.cuda_ptr()?;
    dev.htod(&table, tp)?;
    let count = table.len() as i32;
    dev.launch(
        "optim.cu",
        "adamw_multi_f32",
        (blocks as u32, 1, 1),
        (THREADS as u32, 1, 1),
        0,
        &[
            arg(&tp),
            arg(&count),
            arg(&k.one_minus_beta1),
            arg(&k.beta2),
            arg(&k.one_minus_beta2),
            arg(&k.eps),
        ],
    )
}

/// Scalars of one SGD update, already rounded to f32 by the caller.
#[derive(Debug, Clone, Copy)]
pub struct SgdCoefs {
    pub weight_decay: Option<f32>,
    pub momentum: f32,
    pub one_minus_dampening: f32,
    pub neg_lr: f32,
    pub nesterov: bool,
}

/// One SGD update of `p` in place; `buf` is the momentum buffer (None: plain SGD), `first`
/// when it is being initialised by this update.
pub fn sgd_step(
    p: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    first: bool,
    k: &SgdCoefs,
) -> Result<()> {
    let mut others = vec![("gradient", g)];
    if let Some(b) = buf {
        others.push(("momentum buffer", b));
    }
    check_state("Sgd::step", p, &others)?;
    let n = p.numel();
    if n == 0 {
        return Ok(());
    }
    let (pp, gp) = (p.cuda_ptr()?, g.cuda_ptr()?);
    let bp = match buf {
        Some(b) => b.cuda_ptr()?,
        None => 0u64,
    };
    let n64 = n as i64;
    let has_wd = k.weight_decay.is_some() as i64;
    let wd = k.weight_decay.unwrap_or(0.0);
    let (nesterov, first) = (k.nesterov as i64, first as i64);
    device()?.launch(
        "optim.cu",
        "sgd_f32",
        (grid_for(n), 1, 1),
        (THREADS as u32, 1, 1),
        0,
        &[
            arg(&pp),
            arg(&gp),
            arg(&bp),
            arg(&n64),
            arg(&has_wd),
            arg(&wd),
            arg(&k.momentum),
            arg(&k.one_minus_dampening),
            arg(&k.neg_lr),
            arg(&nesterov),
            arg(&first),
        ],
    )
}

/// Σ x² over every element of the device tensors `grads` (f32 or bf16), accumulated in f64:
/// per-block partial sums of each tensor into one buffer, then one final sum and one copy
/// to the host.
pub fn sum_squares(grads: &[Tensor]) -> Result<f64> {
    let grads: Vec<Tensor> = grads
        .iter()
        .filter(|g| g.numel() > 0)
        .map(|g| g.contiguous())
        .collect::<Result<_>>()?;
    if grads.is_empty() {
        return Ok(0.0);
    }
    let blocks: Vec<usize> = grads.iter().map(|g| grid_for(g.numel()) as usize).collect();
    let total: usize = blocks.iter().sum();
    // f64 scratch: partials, then the final sum.
    let part = Tensor::empty_cuda(&[total + 1], DType::F64)?;
    let base = part.cuda_ptr()?;
    let dev = device()?;
    let mut at = 0usize;
    for (g, &nb) in grads.iter().zip(&blocks) {
        let sfx = suffix(g.dtype(), "clip_grad_norm")?;
        let (gp, n64, pp) = (g.cuda_ptr()?, g.numel() as i64, base + (at * 8) as u64);
        dev.launch(
            "optim.cu",
            &format!("sumsq_partial_{sfx}"),
            (nb as u32, 1, 1),
            (THREADS as u32, 1, 1),
            0,
            &[arg(&gp), arg(&n64), arg(&pp)],
        )?;
        at += nb;
    }
    let (total64, outp) = (total as i64, base + (total * 8) as u64);
    dev.launch(
        "optim.cu",
        "sumsq_final",
        (1, 1, 1),
        (1024, 1, 1),
        0,
        &[arg(&base), arg(&total64), arg(&outp)],
    )?;
    let mut res = [0f64; 1];
    dev.dtoh(outp, &mut res)?;
    Ok(res[0])
}

/// A new contiguous device tensor `g * c` (`c` already rounded to `g`'s dtype).
pub fn scale(g: &Tensor, c: f32) -> Result<Tensor> {
    let sfx = suffix(g.dtype(), "clip_grad_norm")?;
    let g = g.contiguous()?;
    let out = Tensor::empty_cuda(g.shape(), g.dtype())?;
    let n = g.numel();
    if n == 0 {
        return Ok(out);
    }
    let (gp, op, n64) = (g.cuda_ptr()?, out.cuda_ptr()?, n as i64);
    device()?.launch(
        "optim.cu",
        &format!("grad_scale_{sfx}"),
        (grid_for(n), 1, 1),
        (THREADS as u32, 1, 1),
        0,
        &[arg(&gp), arg(&op), arg(&c), arg(&n64)],
    )?;
    Ok(out)
}

/// A device copy of `t` with its own buffer (contiguous).
pub fn copy(t: &Tensor) -> Result<Tensor> {
    let src = t.contiguous()?;
    let out = Tensor::empty_cuda(t.shape(), t.dtype())?;
    device()?.dtod(
        src.cuda_ptr()?,
        out.cuda_ptr()?,
        t.numel() * t.dtype().size_in_bytes(),
    )?;
    Ok(out)
}
