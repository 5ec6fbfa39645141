//! Multimodal rotary positions: `get_rope_index` (3 position ids per token: T, H, W) and the
//! M-RoPE cos/sin tables.

use super::config::{Config, TextConfig};
use super::vision::inv_freq_f32;
use crate::{Error, Result, Tensor};

/// M-RoPE position ids: for each axis (T, H, W) a flat [B·seq] vector.
pub struct Positions {
    pub axes: [Vec<i64>; 3],
    pub batch: usize,
    pub seq: usize,
    /// Per row: max position + 1 − tokens (for decoding with a KV cache).
    pub rope_deltas: Vec<i64>,
}

/// Positions and rope deltas as transformers' `get_rope_index` computes them.
///
/// Over the non-padding tokens of each row: text tokens count up on all three axes; a run of
/// image tokens takes the next grid (in batch order) and gets (T, H, W) = (s + t, s + r, s + c)
/// over its merged grid, where s is the position after the preceding text; the text after it
/// continues at s + max(h, w) / merge. Padding positions are 0. rope_delta = max + 1 − n.
pub fn rope_index(
    c: &Config,
    input_ids: &[i64],
    batch: usize,
    seq: usize,
    attention_mask: Option<&[i64]>,
    grids: &[[usize; 3]],
) -> Result<Positions> {
    let m = c.vision.spatial_merge_size;
    let mut axes = [
        vec![0i64; batch * seq],
        vec![0i64; batch * seq],
        vec![0i64; batch * seq],
    ];
    let mut deltas = Vec::with_capacity(batch);
    let mut next_grid = grids.iter().enumerate();
    for b in 0..batch {
        let row = &input_ids[b * seq..(b + 1) * seq];
        let keep: Vec<usize> = (0..seq)
            .filter(|&i| attention_mask.is_none_or(|am| am[b * seq + i] != 0))
            .collect();
        let mut current = 0i64;
        let mut max_pos = -1i64;
        let mut k = 0;
        while k < keep.len() {
            let id = row[keep[k]];
            if id == c.video_token_id {
                return Err(Error::msg(
                    "video inputs are not supported yet (video_token_id in input_ids)",
                ));
            }
            if id != c.image_token_id {
                for axis in axes.iter_mut() {
                    axis[b * seq + keep[k]] = current;
                }
                max_pos = max_pos.max(current);
                current += 1;
                k += 1;
                continue;
            }
            let run = keep[k..]
                .iter()
                .take_while(|&&i| row[i] == c.image_token_id)
                .count();
            let (gi, g) = next_grid.next().ok_or_else(|| {
                Error::msg(format!(
                    "row {b}: more image-token runs than image_grid_thw entries ({})",
                    grids.len()
                ))
            })?;
            let (t, lh, lw) = (g[0], g[1] / m, g[2] / m);
            if run != t * lh * lw {
                return Err(Error::shape(
                    "rope_index",
                    format!("row {b}: a run of {run} image tokens, but image {gi} with grid {g:?} gives {}", t * lh * lw),
                ));
            }
            let mut j = 0;
            for tt in 0..t {
                for r in 0..lh {
                    for cc in 0..lw {
                        let i = keep[k + j];
                        let p = [current + tt as i64, current + r as i64, current + cc as i64];
                        for (axis, v) in axes.iter_mut().zip(p) {
                            axis[b * seq + i] = v;
                            max_pos = max_pos.max(v);
                        }
                        j += 1;
                    }
                }
            }
            current += lh.max(lw) as i64;
            k += run;
        }
        deltas.push(max_pos + 1 - keep.len() as i64);
    }
    if let Some((gi, _)) = next_grid.next() {
        return Err(Error::msg(format!(
            "image features and image tokens do not match: {} grids given but only {gi} image-token runs in input_ids",
            grids.len()
        )));
    }
    Ok(Positions {
        axes,
        batch,
        seq,
        rope_deltas: deltas,
    })
}

/// cos/sin [B, 1, T, head_dim]: frequency f uses axis 0 (T) for f < s0, 1 (H) for f < s0+s1,
/// else 2 (W); angle = pos[axis]·inv_freq[f] in f32; halves duplicated (rotate-half pairs).
pub fn mrope_tables(
    t: &TextConfig,
    pos: &Positions,
    dtype: crate::DType,
) -> Result<(Tensor, Tensor)> {
    let hd = t.head_dim();
    let inv = inv_freq_f32(t.rope_theta, hd);
    let [s0, s1, _] = t.mrope_section;
    let axis = |f: usize| {
        if f < s0 {
            0
        } else if f < s0 + s1 {
            1
        } else {
            2
        }
    };
    let (batch, seq) = (pos.batch, pos.seq);
    let mut cos = Vec::with_capacity(batch * seq * hd);
    let mut sin = Vec::with_capacity(batch * seq * hd);
    for token in 0..batch * seq {
        let angles: Vec<f32> = (0..hd / 2)
            .map(|f| pos.axes[axis(f)][token] as f32 * inv[f])
            .collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos()));
            sin.extend(angles.iter().map(|a| a.sin()));
        }
    }
    let shape = [batch, 1, seq, hd];
    Ok((
        Tensor::from_vec(cos, &shape)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, &shape)?.to_dtype(dtype)?,
    ))
}
