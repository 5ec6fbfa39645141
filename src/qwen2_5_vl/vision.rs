//! The vision tower: patch embedding, 2D rotary positions, window reordering, window and
//! full-attention blocks, and the 2x2 patch merger.
//!
//! pixel_values [S, C·tp·p·p] (S patches, rows in raster order over 2x2 merge blocks, each
//! block's 4 patches contiguous) -> image features [S/4, out_hidden] in the same order.

use super::config::VisionConfig;
use crate::nn::Params;
use crate::ops::attention::AttentionOptions;
use crate::{Error, Result, Tensor};

/// Everything about the token layout that depends only on the grids (no weights).
#[derive(Clone)]
pub struct VisionPlan {
    /// Patch rows in window order (index into the raster-order rows), [S].
    pub window_rows: Tensor,
    /// Merged units back from window order to raster order (argsort of the unit order), [S/4].
    pub unit_inverse: Tensor,
    /// Segment boundaries (in patches) of the windows and of the full images.
    pub cu_window: Vec<usize>,
    pub cu_full: Vec<usize>,
    /// Rotary tables in window order, [S, head_dim] (they broadcast over [1, heads, S, hd]).
    pub cos: Tensor,
    pub sin: Tensor,
}

/// f32 inverse frequencies `1 / theta^(2i/dim)` for i < dim/2, computed in f32 as PyTorch does.
pub(crate) fn inv_freq_f32(theta: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect()
}

impl VisionPlan {
    pub fn new(grids: &[[usize; 3]], c: &VisionConfig) -> Result<VisionPlan> {
        let m = c.spatial_merge_size;
        let unit = m * m;
        let win = c.window_size / m / c.patch_size; // window side in merged units
        let hd = c.head_dim();
        // Axial 2D rope: hd/4 frequencies per axis, angles [h·f, w·f], duplicated for the pairs.
        let inv = inv_freq_f32(c.rope_theta, hd / 2);
        let mut unit_order: Vec<usize> = Vec::new();
        let mut cu_window = vec![0usize];
        let mut cu_full = vec![0usize];
        // (hpos, wpos) of each patch in raster-of-blocks order.
        let mut pos: Vec<(usize, usize)> = Vec::new();
        let mut offset = 0;
        for (gi, &[t, h, w]) in grids.iter().enumerate() {
            if t == 0 || h % m != 0 || w % m != 0 {
                return Err(Error::shape(
                    "vision",
                    format!(
                        "image {gi}: grid [{t}, {h}, {w}] is not a multiple of the merge size {m}"
                    ),
                ));
            }
            let (lh, lw) = (h / m, w / m);
            for _ in 0..t {
                for bh in 0..lh {
                    for bw in 0..lw {
                        for mh in 0..m {
                            for mw in 0..m {
                                pos.push((bh * m + mh, bw * m + mw));
                            }
                        }
                    }
                }
                cu_full.push(cu_full.last().unwrap() + h * w);
            }
            let (nwh, nww) = ((lh + win - lh % win) / win, (lw + win - lw % win) / win);
            for tt in 0..t {
                for wy in 0..nwh {
                    for wx in 0..nww {
                        let mut n = 0;
                        for r in wy * win..((wy + 1) * win).min(lh) {
                            for cc in wx * win..((wx + 1) * win).min(lw) {
                                unit_order.push(offset + tt * lh * lw + r * lw + cc);
                                n += 1;
                            }
                        }
                        let last = *cu_window.last().unwrap();
                        if n > 0 {
                            cu_window.push(last + n * unit);
                        }
                    }
                }
            }
            offset += t * lh * lw;
        }
        let s = pos.len();
        let rows: Vec<i64> = unit_order
            .iter()
            .flat_map(|&u| (0..unit).map(move |k| (u * unit + k) as i64))
            .collect();
        let mut inverse = vec![0i64; unit_order.len()];
        for (i, &u) in unit_order.iter().enumerate() {
            inverse[u] = i as i64;
        }
        // Window order: angles [h·f, w·f] over the two axes.
        let (hpos, wpos): (Vec<i64>, Vec<i64>) = rows
            .iter()
            .map(|&r| (pos[r as usize].0 as i64, pos[r as usize].1 as i64))
            .unzip();
        let freqs: Vec<f32> = inv.iter().chain(&inv).copied().collect();
        let axis_of: Vec<usize> = (0..freqs.len()).map(|f| f / inv.len()).collect();
        let (cos, sin) = super::rope::rotary_tables(
            &[&hpos, &wpos],
            &axis_of,
            &freqs,
            &[s, hd],
            crate::DType::F32,
        )?;
        Ok(VisionPlan {
            window_rows: Tensor::from_vec(rows, &[s])?,
            unit_inverse: Tensor::from_vec(inverse, &[s / unit])?,
            cu_window,
            cu_full,
            cos,
            sin,
        })
    }
}

/// What every block of one forward reads besides its own weights: the config, the plan
/// (window order, segments, rotary tables) and whether the MLP is padded (see [`Mlp`]).
#[derive(Clone)]
struct Tower {
    c: VisionConfig,
    plan: VisionPlan,
    pad_mlp: bool,
}

impl Tower {
    fn full_attention(&self, i: usize) -> bool {
        self.c.fullatt_block_indexes.contains(&i)
    }
}

/// One block: x + proj(attn(rope(qkv(norm1 x)))) then x + mlp(norm2 x), all with biases.
/// The last add is left to the caller: given x and the previous block's MLP output still to
/// be added (`pending`), returns (x after attention, this block's MLP output), so that each
/// residual add is fused with the norm after it (`add_rms_norm`).
fn block(
    x: &Tensor,
    pending: Option<&Tensor>,
    p: &Params,
    i: usize,
    tower: &Tower,
) -> Result<(Tensor, Tensor)> {
    let Tower { c, plan, pad_mlp } = tower;
    let name = |s: &str| format!("visual.blocks.{i}.{s}");
    let w = |s: &str| p.require(&name(s));
    let (s, hd, nh) = (x.dim(0)?, c.head_dim(), c.num_heads);
    let (cu, part) = if tower.full_attention(i) {
        (&plan.cu_full, "vision attention (full)")
    } else {
        (&plan.cu_window, "vision attention (windows)")
    };
    let part = crate::autograd::part(part);
    let (x, y) = x.add_opt_rms_norm(pending, w("norm1.weight")?, 1e-6)?;
    let qkv = y
        .linear(w("attn.qkv.weight")?, Some(w("attn.qkv.bias")?))?
        .reshape(&[s, 3, nh, hd])?
        .split(&[1, 1, 1], 1)?;
    let piece = |k: usize| qkv[k].squeeze(1); // [S, H, hd]
    let (cos, sin) = (&plan.cos, &plan.sin);
    let heads = |t: Tensor| t.transpose(0, 1)?.unsqueeze(0); // [1, H, S, hd]

    // Rope of the heads-first views writes q and k contiguous, as attention reads them (the
    // other order needed a copy of each).
    let q = heads(piece(0)?)?.rope(cos, sin)?;
    let k = heads(piece(1)?)?.rope(cos, sin)?;
    // Contiguous once, as attention reads it (else copied in its forward and backward), and so
    // that the saved v does not hold the whole qkv product alive.
    let v = heads(piece(2)?)?.contiguous()?;
    let opts = AttentionOptions {
        cu_seqlens: Some(cu.clone()),
        ..Default::default()
    };
    let a = Tensor::attention(&q, &k, &v, &opts)?
        .squeeze(0)?
        .transpose(0, 1)?
        .reshape(&[s, nh * hd])?;
    let proj = a.linear(w("attn.proj.weight")?, Some(w("attn.proj.bias")?))?;
    drop(part);
    let _part = crate::autograd::part("vision mlp");
    let (x, y) = x.add_rms_norm(&proj, w("norm2.weight")?, 1e-6)?;
    let m = Mlp::new(&w, *pad_mlp)?;
    let gate = y.linear(&m.gate_w, Some(&m.gate_b))?;
    let up = y.linear(&m.up_w, Some(&m.up_b))?;
    Ok((x, gate.swiglu(&up)?.linear(&m.down_w, Some(&m.down_b))?))
}

/// A block's MLP weights. On CUDA an intermediate size that is not a multiple of 8 (the 3B
/// model's 3420) is rounded up with zero rows of gate and up (and their biases) and zero
/// columns of down: the extra activations are SiLU(0)·0 = 0 and meet zero weights, and the
/// extra gradients are dropped by `zero_pad`'s backward, so the results are the same. The
/// tensor-core GEMM reads operands by TMA, which needs 16-byte row strides: unpadded, each
/// block's backward copied its [tokens, 3420] operands into padded or transposed buffers (6
/// `pad_cols` and 9 `transpose` launches, 3.1 ms of the 3B step in run 12's profile) and 4 of
/// its GEMMs stored without the TMA epilogue. Padding the weights copies 26 MB a block instead
/// (gate, up and down: 3 x 1280 x 3424 bf16), inference included.
struct Mlp {
    gate_w: Tensor,
    gate_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    down_w: Tensor,
    down_b: Tensor,
}

impl Mlp {
    fn new<'a>(w: &impl Fn(&str) -> Result<&'a Tensor>, pad: bool) -> Result<Mlp> {
        let (gate_w, up_w, down_w) = (
            w("mlp.gate_proj.weight")?,
            w("mlp.up_proj.weight")?,
            w("mlp.down_proj.weight")?,
        );
        let n = gate_w.dim(0)?;
        let extra = if pad { n.next_multiple_of(8) - n } else { 0 };
        // The intermediate dim (`dim` of `t`) with `extra` zeros after it.
        let padded = |t: &Tensor, dim: isize| -> Result<Tensor> {
            if extra > 0 {
                t.zero_pad(dim, 0, extra)
            } else {
                Ok(t.clone())
            }
        };
        Ok(Mlp {
            gate_w: padded(gate_w, 0)?,
            gate_b: padded(w("mlp.gate_proj.bias")?, 0)?,
            up_w: padded(up_w, 0)?,
            up_b: padded(w("mlp.up_proj.bias")?, 0)?,
            down_w: padded(down_w, 1)?,
            down_b: w("mlp.down_proj.bias")?.clone(),
        })
    }
}

/// `block` under `autograd::checkpoint`: its inputs kept, its forward computed again in the
/// backward with the block's weights (`visual.blocks.{i}.*`) passed as params.
fn block_checkpointed(
    x: &Tensor,
    pending: Option<&Tensor>,
    p: &Params,
    i: usize,
    tower: &Tower,
) -> Result<(Tensor, Tensor)> {
    let tower = tower.clone();
    let mut inputs = vec![x];
    inputs.extend(pending);
    let prefix = format!("visual.blocks.{i}.");
    let outs = p.checkpoint_block(&prefix, &inputs, move |xs, p| {
        let (x, mlp) = block(&xs[0], xs.get(1), p, i, &tower)?;
        Ok(vec![x, mlp])
    })?;
    let mut it = outs.into_iter();
    Ok((it.next().expect("x"), it.next().expect("mlp")))
}

/// pixel_values [S, patch_dim] and the image grids -> features [S/4, out_hidden] (raster order).
pub fn vision_forward(
    p: &Params,
    c: &VisionConfig,
    pixel_values: &Tensor,
    grids: &[[usize; 3]],
) -> Result<Tensor> {
    vision_forward_with(p, c, pixel_values, grids, false)
}

/// `vision_forward`, with each block checkpointed (`autograd::checkpoint`: it keeps its inputs
/// and computes its forward again in the backward) when `checkpoint` and gradients are on.
pub fn vision_forward_with(
    p: &Params,
    c: &VisionConfig,
    pixel_values: &Tensor,
    grids: &[[usize; 3]],
    checkpoint: bool,
) -> Result<Tensor> {
    let cuda = p.require("visual.patch_embed.proj.weight")?.is_cuda();
    let pad = cuda && MLP_PAD.get() != Some(0);
    forward_with(p, c, pixel_values, grids, pad, checkpoint)
}

/// `TESSERA_VISION_MLP_PAD=0`: the vision MLP unpadded on CUDA too (see [`Mlp`]), for measuring
/// what the padding saves.
static MLP_PAD: crate::backend::cuda::Switch =
    crate::backend::cuda::Switch::new("TESSERA_VISION_MLP_PAD");

/// `vision_forward`, with the MLP's intermediate size padded to a multiple of 8 or not
/// (see [`Mlp`]).
fn forward_with(
    p: &Params,
    c: &VisionConfig,
    pixel_values: &Tensor,
    grids: &[[usize; 3]],
    pad_mlp: bool,
    checkpoint: bool,
) -> Result<Tensor> {
    let s: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    if pixel_values.rank() != 2
        || pixel_values.dim(0)? != s
        || pixel_values.dim(1)? != c.patch_dim()
    {
        return Err(Error::shape(
            "vision",
            format!(
                "pixel_values {:?} do not match image_grid_thw {grids:?} (expected [{s}, {}])",
                pixel_values.shape(),
                c.patch_dim()
            ),
        ));
    }
    let embed_part = crate::autograd::part("vision patch embedding");
    let mut plan = VisionPlan::new(grids, c)?;
    let dtype = p.require("visual.patch_embed.proj.weight")?.dtype();
    let device = p.require("visual.patch_embed.proj.weight")?.device();
    // The rotary tables once on the parameters' device and dtype (not per block).
    plan.cos = plan.cos.to_device(device)?.to_dtype(dtype)?;
    plan.sin = plan.sin.to_device(device)?.to_dtype(dtype)?;
    let pe = p
        .require("visual.patch_embed.proj.weight")?
        .reshape(&[c.hidden_size, c.patch_dim()])?;
    let x = pixel_values
        .to_device(pe.device())?
        .to_dtype(dtype)?
        .linear(&pe, None)?;
    let mut x = x.index_select(&plan.window_rows, 0)?;
    drop(embed_part);
    let tower = Tower {
        c: c.clone(),
        plan,
        pad_mlp,
    };
    let mut pending = None;
    for i in 0..c.depth {
        let (next, mlp) = if checkpoint && crate::autograd::is_grad_enabled() {
            block_checkpointed(&x, pending.as_ref(), p, i, &tower)?
        } else {
            block(&x, pending.as_ref(), p, i, &tower)?
        };
        (x, pending) = (next, Some(mlp));
    }
    let _part = crate::autograd::part("vision merger");
    let unit = c.spatial_merge_size * c.spatial_merge_size;
    let ln_q = p.require("visual.merger.ln_q.weight")?;
    let y = x
        .add_opt_rms_norm(pending.as_ref(), ln_q, 1e-6)?
        .1
        .reshape(&[s / unit, c.hidden_size * unit])?;
    let z = y
        .linear(
            p.require("visual.merger.mlp.0.weight")?,
            Some(p.require("visual.merger.mlp.0.bias")?),
        )?
        .gelu()?
        .linear(
            p.require("visual.merger.mlp.2.weight")?,
            Some(p.require("visual.merger.mlp.2.bias")?),
        )?;
    z.index_select(&tower.plan.unit_inverse, 0)
}

/// Number of language-model tokens an image of this grid becomes.
pub fn tokens_for_grid(g: &[usize; 3], c: &VisionConfig) -> usize {
    g[0] * g[1] * g[2] / (c.spatial_merge_size * c.spatial_merge_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qwen2_5_vl::{config::Config, weights};
    use crate::{DType, Rng};

    /// The MLP padded to a multiple of 8 (CUDA's layout) gives the unpadded features and
    /// vision gradients: a 44-wide MLP (padded to 48), biases and weights random, in f64.
    #[test]
    fn padded_mlp_matches_unpadded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/qwen_parity/tied_gqa/config.json");
        let mut config = Config::from_file(dir).unwrap();
        config.vision.intermediate_size = 44;
        let c = &config.vision;
        let mut rng = Rng::new(11);
        let base = weights::random_params(&config, DType::F64, &mut rng).unwrap();
        let mut p = Params::default();
        for (name, t) in base.iter() {
            if name.starts_with("visual.") {
                let r = Tensor::randn(t.shape(), 0.3, DType::F64, &mut rng).unwrap();
                p.push(name, &r.requires_grad_());
            }
        }
        let grids = [[1, 4, 8], [1, 2, 2]];
        let s: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let pixels = Tensor::randn(&[s, c.patch_dim()], 1.0, DType::F64, &mut rng).unwrap();
        let probe = Tensor::randn(&[s / 4, c.out_hidden_size], 1.0, DType::F64, &mut rng).unwrap();
        let run = |pad: bool| {
            for (_, t) in p.iter() {
                t.zero_grad();
            }
            let f = forward_with(&p, c, &pixels, &grids, pad, false).unwrap();
            f.mul(&probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads: Vec<Vec<f64>> = p
                .iter()
                .map(|(n, t)| {
                    let g = t.grad().unwrap_or_else(|| panic!("{n}: no gradient"));
                    assert_eq!(g.shape(), t.shape(), "{n}");
                    g.to_f64s().unwrap()
                })
                .collect();
            (f.to_f64s().unwrap(), grads)
        };
        let (f0, g0) = run(false);
        let (f1, g1) = run(true);
        let close = |a: &[f64], b: &[f64], what: &str| {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                    "{what}: {x} vs {y}"
                );
            }
        };
        close(&f1, &f0, "features");
        for ((name, _), (a, b)) in p.iter().zip(g1.iter().zip(&g0)) {
            close(a, b, name);
        }
    }
}
