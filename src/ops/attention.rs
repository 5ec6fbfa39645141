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

    /// How many leading keys of the block of keys `j0..j0 + nk` query `i` sees, when that is
    /// all it sees (no key padding; blocks never cross a segment); None with key padding.
    #[inline]
    fn visible_prefix(&self, i: usize, j0: usize, nk: usize) -> Option<usize> {
        if self.padding.is_some() {
            return None;
        }
        if !self.causal {
            return Some(nk);
        }
        let last = i as isize + self.offset - j0 as isize;
        Some((last + 1).clamp(0, nk as isize) as usize)
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

/// A block of one head: queries `i0..i0 + nq` against keys `j0..j0 + nk`. From `Block::all`:
/// without segments the whole head; with them, one segment (a token sees only its own
/// segment, so the rest of the T x T matrix is never computed). From `Block::tiles`: up to
/// TILE_Q rows of such a block, with the keys they can see.
#[derive(Clone, Copy)]
struct Block {
    i0: usize,
    nq: usize,
    j0: usize,
    nk: usize,
}

/// Query rows per tile. A tile's probabilities (TILE_Q x its keys: 256 KiB at 1024 keys) stay
/// in the L2 cache, and under a causal mask a tile multiplies only the keys its last row sees:
/// the upper triangle of Q Kᵀ is skipped tile by tile (about half the work of a long causal
/// sequence). With Tq == Tk a tile's rows sum the same keys in the same order as the whole
/// block did (the keys it drops were masked), so the forward keeps its bits unless a small
/// tile takes another matrix-product kernel than the block; with Tq != Tk the softmax sums
/// of some rows may differ in the last bit.
const TILE_Q: usize = 64;

/// The backward tiles only blocks longer than this. Tiling changes the order in which dK and
/// dV sum their rows' contributions, so shorter blocks run whole, as before tiling existed:
/// training on short sequences (the study's) keeps its results to the last bit, and at
/// these lengths the skipped triangle is worth little.
const BWD_TILED_FROM: usize = 4 * TILE_Q;

impl Block {
    /// This block's query rows in tiles of at most TILE_Q rows, each with the keys its last
    /// row can see under a causal mask (possibly none).
    fn tiles(self, vis: &Visibility) -> Vec<Block> {
        (self.i0..self.i0 + self.nq)
            .step_by(TILE_Q)
            .map(|i0| {
                let nq = TILE_Q.min(self.i0 + self.nq - i0);
                let nk = if vis.causal {
                    // One past the last key that row i0 + nq - 1 sees, from j0.
                    let end = (i0 + nq) as isize + vis.offset - self.j0 as isize;
                    end.clamp(0, self.nk as isize) as usize
                } else {
                    self.nk
                };
                Block {
                    i0,
                    nq,
                    j0: self.j0,
                    nk,
                }
            })
            .collect()
    }

    fn all(dims: &Dims, vis: &Visibility) -> Vec<Block> {
        match &vis.segment {
            None => vec![Block {
                i0: 0,
                nq: dims.tq,
                j0: 0,
                nk: dims.tk,
            }],
            Some(seg) => {
                let mut blocks = Vec::new();
                let mut start = 0;
                for i in 1..=seg.len() {
                    if i == seg.len() || seg[i] != seg[start] {
                        blocks.push(Block {
                            i0: start,
                            nq: i - start,
                            j0: start,
                            nk: i - start,
                        });
                        start = i;
                    }
                }
                blocks
            }
        }
    }
}

/// S = scale·Q Kᵀ for one block of one head (`q` and `k` are the head's whole [T, D]
/// slices), masked, with P = softmax rows in place in `p` [nq, nk]; returns lse per row.
/// `lse_in`: use these (backward, the block's rows) instead of computing them.
#[allow(clippy::too_many_arguments)]
fn probs<T: Float>(
    q: &[T],
    k: &[T],
    dims: &Dims,
    vis: &Visibility,
    b: usize,
    blk: Block,
    p: &mut [T],
    lse_in: Option<&[T]>,
) -> Vec<T> {
    let Block { i0, nq, j0, nk } = blk;
    if nk == 0 {
        // A tile that sees no key (causal with Tq > Tk, or Tk == 0): its rows output zeros.
        return vec![T::neg_infinity(); nq];
    }
    let d = dims.d;
    unsafe {
        cpu::gemm(
            nq,
            nk,
            d,
            p.as_mut_ptr(),
            false,
            MatRef {
                ptr: q[i0 * d..].as_ptr(),
                rs: d as isize,
                cs: 1,
            },
            MatRef {
                ptr: k[j0 * d..].as_ptr(),
                rs: 1,
                cs: d as isize,
            },
            false,
        );
    }
    let scale = T::c(dims.scale);
    let mut lse = vec![T::neg_infinity(); nq];
    for i in 0..nq {
        let row = &mut p[i * nk..(i + 1) * nk];
        let m = match vis.visible_prefix(i0 + i, j0, nk) {
            // Without key padding the visible keys of a row are a prefix of the block (a
            // block lies inside one segment): no per-key test, and loops that vectorise.
            Some(lim) => {
                row[..lim].iter_mut().for_each(|e| *e *= scale);
                row[lim..].iter_mut().for_each(|e| *e = T::neg_infinity());
                cpu::rows::max(&row[..lim])
            }
            None => {
                let mut m = T::neg_infinity();
                for (j, e) in row.iter_mut().enumerate() {
                    *e = if vis.visible(b, i0 + i, j0 + j) {
                        *e * scale
                    } else {
                        T::neg_infinity()
                    };
                    if *e > m {
                        m = *e;
                    }
                }
                m
            }
        };
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
            let tiles: Vec<Block> = Block::all(&dims, &vis).into_iter().flat_map(|blk| blk.tiles(&vis)).collect();
            let nt = tiles.len();
            (0..b * hq * nt).into_par_iter().for_each(|task| {
                let (bh, blk) = (task / nt, tiles[task % nt]);
                let (bi, h) = (bh / hq, bh % hq);
                let kvh = bi * hkv + h / group;
                let qh = &qv[bh * tq * d..(bh + 1) * tq * d];
                let kh = &kv[kvh * tk * d..(kvh + 1) * tk * d];
                let vh = &vv[kvh * tk * dv..(kvh + 1) * tk * dv];
                let mut p = vec![T::zero(); blk.nq * blk.nk];
                let l = probs(qh, kh, &dims, &vis, bi, blk, &mut p, None);
                unsafe {
                    // Tiles of one head cover disjoint query rows.
                    let row0 = bh * tq + blk.i0;
                    std::ptr::copy_nonoverlapping(l.as_ptr(), pl.get().add(row0), blk.nq);
                    if blk.nk > 0 {
                        cpu::gemm(blk.nq, dv, blk.nk, po.get().add(row0 * dv), false,
                            MatRef { ptr: p.as_ptr(), rs: blk.nk as isize, cs: 1 },
                            MatRef { ptr: vh[blk.j0 * dv..].as_ptr(), rs: dv as isize, cs: 1 }, false);
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
                // One task per kv head and block: it owns dK/dV of that head's block rows
                // (blocks have disjoint keys) and dQ of its group's block rows, and runs
                // the block's query tiles in turn (one, the block, up to BWD_TILED_FROM rows).
                let blocks = Block::all(&dims, &vis);
                let nb = blocks.len();
                (0..b * hkv * nb).into_par_iter().for_each(|task| {
                    let (bk, blk) = (task / nb, blocks[task % nb]);
                    let bi = bk / hkv;
                    let kh = &kv[bk * tk * d..(bk + 1) * tk * d];
                    let vh = &vv[bk * tk * dv..(bk + 1) * tk * dv];
                    let tiles = if blk.nq > BWD_TILED_FROM { blk.tiles(&vis) } else { vec![blk] };
                    let cap = tiles.iter().map(|t| t.nq * t.nk).max().unwrap_or(0);
                    let (mut p, mut dp) = (vec![T::zero(); cap], vec![T::zero(); cap]);
                    let heads = (bk % hkv) * group..(bk % hkv + 1) * group;
                    // Tile by tile (a tile that sees no key leaves its dQ rows zero), each
                    // query head of the group.
                    let work = tiles.iter().filter(|t| t.nk > 0).flat_map(|&t| heads.clone().map(move |h| (t, h)));
                    for (tile, h) in work {
                        let Block { i0, nq, j0, nk } = tile;
                        let (p, dp) = (&mut p[..nq * nk], &mut dp[..nq * nk]);
                        let bh = bi * hq + h;
                        let qh = &qv[bh * tq * d..(bh + 1) * tq * d];
                        let oh = &ov[(bh * tq + i0) * dv..(bh * tq + i0 + nq) * dv];
                        let gh = &gv[(bh * tq + i0) * dv..(bh * tq + i0 + nq) * dv];
                        let row0 = bh * tq + i0;
                        probs(qh, kh, &dims, &vis, bi, tile, p, Some(&lv[row0..row0 + nq]));
                        unsafe {
                            // dV += Pᵀ dO
                            cpu::gemm(nk, dv, nq, pv.get().add((bk * tk + j0) * dv), true,
                                MatRef { ptr: p.as_ptr(), rs: 1, cs: nk as isize },
                                MatRef { ptr: gh.as_ptr(), rs: dv as isize, cs: 1 }, false);
                            // dP = dO Vᵀ
                            cpu::gemm(nq, nk, dv, dp.as_mut_ptr(), false,
                                MatRef { ptr: gh.as_ptr(), rs: dv as isize, cs: 1 },
                                MatRef { ptr: vh[j0 * dv..].as_ptr(), rs: 1, cs: dv as isize }, false);
                        }
                        for i in 0..nq {
                            let delta: T = (0..dv).map(|e| gh[i * dv + e] * oh[i * dv + e]).sum();
                            for j in 0..nk {
                                let idx = i * nk + j;
                                dp[idx] = p[idx] * (dp[idx] - delta) * scale;
                            }
                        }
                        unsafe {
                            // dQ = dS K ; dK += dSᵀ Q
                            cpu::gemm(nq, d, nk, pq.get().add(row0 * d), false,
                                MatRef { ptr: dp.as_ptr(), rs: nk as isize, cs: 1 },
                                MatRef { ptr: kh[j0 * d..].as_ptr(), rs: d as isize, cs: 1 }, false);
                            cpu::gemm(nk, d, nq, pk.get().add((bk * tk + j0) * d), true,
                                MatRef { ptr: dp.as_ptr(), rs: 1, cs: nk as isize },
                                MatRef { ptr: qh[i0 * d..].as_ptr(), rs: d as isize, cs: 1 }, false);
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
