//! Fused scaled-dot-product attention with a stable softmax.
//!
//! q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] -> out [B, Hq, Tq, Dv].
//! Grouped-query heads: query head h reads kv head h / (Hq / Hkv), never materialised.
//! Masks (all optional, combined): `causal` (bottom-right aligned: query i sees keys
//! j <= i + Tk - Tq, which is what decoding with a KV cache needs), `key_padding` [B, Tk]
//! (nonzero = a real token), `cu_seqlens` segment boundaries [0, t1, ..., T] (Tq == Tk; a
//! token attends only inside its segment — the vision tower's windows).
//! A query row with no visible key outputs zeros.
//!
//! Forward per (b, h): S = scale·QKᵀ, P = softmax(S), O = PV; saves lse = logsumexp(S).
//! Backward: P = exp(S − lse); dV = Σ_group Pᵀ dO; dP = dO Vᵀ; Δ_i = Σ_e dO_ie O_ie;
//! dS = P ∘ (dP − Δ); dQ = scale·dS K; dK = Σ_group scale·dSᵀ Q.

use crate::autograd::record;
use crate::backend::cpu::{self, MatRef, SyncPtr};
use crate::tensor::{Float, Tensor};
use crate::{float_dispatch, Error, Result};
use num_traits::Zero;
use rayon::prelude::*;

#[derive(Debug, Clone, Default)]
pub struct AttentionOptions {
    pub causal: bool,
    /// Defaults to 1/sqrt(D).
    pub scale: Option<f64>,
    /// [B, Tk], nonzero where the key is a real token.
    pub key_padding: Option<Tensor>,
    /// Segment boundaries over the sequence, starting at 0 and ending at T.
    pub cu_seqlens: Option<Vec<usize>>,
}

/// Which keys each query sees; shared by forward and backward.
struct Visibility {
    causal: bool,
    offset: isize,
    tk: usize,
    padding: Option<Vec<bool>>,
    segment: Option<Vec<usize>>,
}

impl Visibility {
    #[inline]
    fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        if self.causal && j as isize > i as isize + self.offset {
            return false;
        }
        if let Some(p) = &self.padding {
            if !p[b * self.tk + j] {
                return false;
            }
        }
        if let Some(s) = &self.segment {
            if s[i] != s[j] {
                return false;
            }
        }
        true
    }
}

struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
    scale: f64,
}

/// S = scale·Q Kᵀ for one head, masked, with P = softmax rows in place; returns lse per row.
/// `lse_in`: use these (backward) instead of computing them.
#[allow(clippy::too_many_arguments)]
fn probs<T: Float>(
    q: &[T],
    k: &[T],
    dims: &Dims,
    vis: &Visibility,
    b: usize,
    p: &mut [T],
    lse_in: Option<&[T]>,
) -> Vec<T> {
    let (tq, tk, d) = (dims.tq, dims.tk, dims.d);
    unsafe {
        cpu::gemm(
            tq,
            tk,
            d,
            p.as_mut_ptr(),
            false,
            MatRef {
                ptr: q.as_ptr(),
                rs: d as isize,
                cs: 1,
            },
            MatRef {
                ptr: k.as_ptr(),
                rs: 1,
                cs: d as isize,
            },
            false,
        );
    }
    let scale = T::c(dims.scale);
    let mut lse = vec![T::neg_infinity(); tq];
    for i in 0..tq {
        let row = &mut p[i * tk..(i + 1) * tk];
        let mut m = T::neg_infinity();
        for (j, e) in row.iter_mut().enumerate() {
            *e = if vis.visible(b, i, j) {
                *e * scale
            } else {
                T::neg_infinity()
            };
            if *e > m {
                m = *e;
            }
        }
        if m == T::neg_infinity() {
            row.iter_mut().for_each(|e| *e = T::zero());
            continue;
        }
        let l = match lse_in {
            Some(l) => l[i],
            None => {
                let s: T = cpu::rows::sum_exp(row, m);
                m + s.ln()
            }
        };
        lse[i] = l;
        row.iter_mut().for_each(|e| *e = (*e - l).exp_fast());
    }
    lse
}

fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
) -> Result<(Dims, Visibility)> {
    let bad = |msg: String| Error::shape("attention", msg);
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(bad(format!(
            "q, k, v must be [B, H, T, D], got {:?}, {:?}, {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    let (b, hq, tq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (hkv, tk) = (k.shape()[1], k.shape()[2]);
    let dv = v.shape()[3];
    if k.shape() != [b, hkv, tk, d] || v.shape()[..3] != [b, hkv, tk] {
        return Err(bad(format!(
            "q {:?}, k {:?}, v {:?} do not fit",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(bad(format!(
            "{hq} query heads are not a multiple of {hkv} kv heads"
        )));
    }
    let padding = match &opts.key_padding {
        None => None,
        // An all-ones mask is no mask (lets the fused kernels take the unmasked path).
        Some(m) if m.shape() == [b, tk] => Some(m.to_mask()?).filter(|v| v.iter().any(|&x| !x)),
        Some(m) => return Err(bad(format!("key_padding {:?} != [{b}, {tk}]", m.shape()))),
    };
    let segment = match &opts.cu_seqlens {
        None => None,
        Some(cu) => {
            if tq != tk
                || cu.first() != Some(&0)
                || cu.last() != Some(&tq)
                || cu.windows(2).any(|w| w[0] > w[1])
            {
                return Err(bad(format!(
                    "cu_seqlens {cu:?} must rise from 0 to T = {tq} (and Tq == Tk)"
                )));
            }
            let mut seg = vec![0; tq];
            for (s, w) in cu.windows(2).enumerate() {
                seg[w[0]..w[1]].iter_mut().for_each(|e| *e = s);
            }
            Some(seg)
        }
    };
    let scale = opts.scale.unwrap_or(1.0 / (d as f64).sqrt());
    Ok((
        Dims {
            b,
            hq,
            hkv,
            tq,
            tk,
            d,
            dv,
            scale,
        },
        Visibility {
            causal: opts.causal,
            offset: tk as isize - tq as isize,
            tk,
            padding,
            segment,
        },
    ))
}

impl Tensor {
    /// See the module doc for shapes and masks.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: &AttentionOptions,
    ) -> Result<Tensor> {
        let (dims, vis) = check(q, k, v, opts)?;
        if q.is_cuda() || k.is_cuda() || v.is_cuda() {
            let params = crate::backend::cuda::ops::attention::AttnParams {
                causal: vis.causal,
                scale: dims.scale,
                key_padding: vis.padding.as_deref(),
                cu_seqlens: opts.cu_seqlens.as_deref(),
            };
            return crate::backend::cuda::ops::attention::attention(q, k, v, &params);
        }
        let (qc, kc, vc) = (
            q.detach().contiguous()?,
            k.detach().contiguous()?,
            v.detach().contiguous()?,
        );
        let Dims {
            b,
            hq,
            hkv,
            tq,
            tk,
            d,
            dv,
            ..
        } = dims;
        let group = hq / hkv;
        let (out, lse) = float_dispatch!(q.dtype(), "attention", T => {
            let (qv, kv, vv) = (qc.to_vec::<T>()?, kc.to_vec::<T>()?, vc.to_vec::<T>()?);
            let mut out = vec![T::zero(); b * hq * tq * dv];
            let mut lse = vec![T::zero(); b * hq * tq];
            let (po, pl) = (SyncPtr::new(out.as_mut_ptr()), SyncPtr::new(lse.as_mut_ptr()));
            (0..b * hq).into_par_iter().for_each(|bh| {
                let (bi, h) = (bh / hq, bh % hq);
                let kvh = bi * hkv + h / group;
                let qh = &qv[bh * tq * d..(bh + 1) * tq * d];
                let kh = &kv[kvh * tk * d..(kvh + 1) * tk * d];
                let vh = &vv[kvh * tk * dv..(kvh + 1) * tk * dv];
                let mut p = vec![T::zero(); tq * tk];
                let l = probs(qh, kh, &dims, &vis, bi, &mut p, None);
                unsafe {
                    std::ptr::copy_nonoverlapping(l.as_ptr(), pl.get().add(bh * tq), tq);
                    if tk > 0 {
                        cpu::gemm(tq, dv, tk, po.get().add(bh * tq * dv), false,
                            MatRef { ptr: p.as_ptr(), rs: tk as isize, cs: 1 },
                            MatRef { ptr: vh.as_ptr(), rs: dv as isize, cs: 1 }, false);
                    }
                }
            });
            (Tensor::from_vec(out, &[b, hq, tq, dv])?, Tensor::from_vec(lse, &[b, hq, tq])?)
        });
        let saved_out = out.clone();
        Ok(record("attention", out, &[q, k, v], move |g| {
            let g = g.contiguous()?;
            float_dispatch!(qc.dtype(), "attention_backward", T => {
                let (qv, kv, vv) = (qc.to_vec::<T>()?, kc.to_vec::<T>()?, vc.to_vec::<T>()?);
                let (ov, gv, lv) = (saved_out.to_vec::<T>()?, g.to_vec::<T>()?, lse.to_vec::<T>()?);
                let mut dq = vec![T::zero(); qv.len()];
                let mut dk = vec![T::zero(); kv.len()];
                let mut dvv = vec![T::zero(); vv.len()];
                let (pq, pk, pv) = (SyncPtr::new(dq.as_mut_ptr()), SyncPtr::new(dk.as_mut_ptr()), SyncPtr::new(dvv.as_mut_ptr()));
                let scale = T::c(dims.scale);
                // One task per kv head: it owns dK/dV of that head and dQ of its group.
                (0..b * hkv).into_par_iter().for_each(|bk| {
                    let bi = bk / hkv;
                    let kh = &kv[bk * tk * d..(bk + 1) * tk * d];
                    let vh = &vv[bk * tk * dv..(bk + 1) * tk * dv];
                    let mut p = vec![T::zero(); tq * tk];
                    let mut dp = vec![T::zero(); tq * tk];
                    for h in (bk % hkv) * group..(bk % hkv + 1) * group {
                        let bh = bi * hq + h;
                        let qh = &qv[bh * tq * d..(bh + 1) * tq * d];
                        let oh = &ov[bh * tq * dv..(bh + 1) * tq * dv];
                        let gh = &gv[bh * tq * dv..(bh + 1) * tq * dv];
                        probs(qh, kh, &dims, &vis, bi, &mut p, Some(&lv[bh * tq..(bh + 1) * tq]));
                        unsafe {
                            // dV += Pᵀ dO
                            cpu::gemm(tk, dv, tq, pv.get().add(bk * tk * dv), true,
                                MatRef { ptr: p.as_ptr(), rs: 1, cs: tk as isize },
                                MatRef { ptr: gh.as_ptr(), rs: dv as isize, cs: 1 }, false);
                            // dP = dO Vᵀ
                            cpu::gemm(tq, tk, dv, dp.as_mut_ptr(), false,
                                MatRef { ptr: gh.as_ptr(), rs: dv as isize, cs: 1 },
                                MatRef { ptr: vh.as_ptr(), rs: 1, cs: dv as isize }, false);
                        }
                        for i in 0..tq {
                            let delta: T = (0..dv).map(|e| gh[i * dv + e] * oh[i * dv + e]).sum();
                            for j in 0..tk {
                                let idx = i * tk + j;
                                dp[idx] = p[idx] * (dp[idx] - delta) * scale;
                            }
                        }
                        unsafe {
                            // dQ = dS K ; dK += dSᵀ Q
                            cpu::gemm(tq, d, tk, pq.get().add(bh * tq * d), false,
                                MatRef { ptr: dp.as_ptr(), rs: tk as isize, cs: 1 },
                                MatRef { ptr: kh.as_ptr(), rs: d as isize, cs: 1 }, false);
                            cpu::gemm(tk, d, tq, pk.get().add(bk * tk * d), true,
                                MatRef { ptr: dp.as_ptr(), rs: 1, cs: tk as isize },
                                MatRef { ptr: qh.as_ptr(), rs: d as isize, cs: 1 }, false);
                        }
                    }
                });
                Ok(vec![
                    Some(Tensor::from_vec(dq, qc.shape())?),
                    Some(Tensor::from_vec(dk, kc.shape())?),
                    Some(Tensor::from_vec(dvv, vc.shape())?),
                ])
            })
        }))
    }
}
