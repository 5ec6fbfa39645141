//! Multimodal rotary positions: `get_rope_index` (3 position ids per token: T, H, W) and the
//! M-RoPE cos/sin tables.

use super::config::{Config, TextConfig};
use super::vision::inv_freq_f32;
use crate::{Error, Result, Tensor, WithDType};

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
    let axis_of: Vec<usize> = (0..hd / 2).map(axis).collect();
    let axes = [&pos.axes[0][..], &pos.axes[1][..], &pos.axes[2][..]];
    rotary_tables(&axes, &axis_of, &inv, &[pos.batch, 1, pos.seq, hd], dtype)
}

/// The most position axes `rotary_tables` takes (M-RoPE's T, H, W).
const MAX_AXES: usize = 3;

/// Rotary cos/sin tables of `shape` ([.., rows, 2·freqs.len()]) in `dtype`: row r, frequency f
/// gets the angle `axes[axis_of[f]][r] · freqs[f]` in f32, and each half is duplicated
/// (rotate-half pairs).
///
/// Positions repeat: a text token has the same one on every axis, an image's rows and columns
/// take few values. So each distinct (position, frequency) gets its cos and sin once and the
/// rows gather them; the values are those of a cos/sin a row (the same f32 angle, the same
/// rounding to `dtype`). For the 3B bench's 4 × 1024 tokens that is ~50 K cos/sin pairs where
/// one a row and frequency, each computed twice, made 524 K: ~2 ms of the host's step on this
/// 2-core VM where it took 10, while the device runs the vision tower before the text layers
/// that wait for these tables.
pub(crate) fn rotary_tables(
    axes: &[&[i64]],
    axis_of: &[usize],
    freqs: &[f32],
    shape: &[usize],
    dtype: crate::DType,
) -> Result<(Tensor, Tensor)> {
    use rayon::prelude::*;
    let half = freqs.len();
    let rows = axes.first().map_or(0, |a| a.len());
    if axis_of.len() != half
        || axes.len() > MAX_AXES
        || axis_of.iter().any(|&a| a >= axes.len())
        || axes.iter().any(|a| a.len() != rows)
        || shape.iter().product::<usize>() != rows * 2 * half
    {
        return Err(Error::shape(
            "rotary_tables",
            format!(
                "{} axes of {rows} rows, {half} frequencies, axis_of {axis_of:?}: not a table of shape {shape:?}",
                axes.len()
            ),
        ));
    }
    if !dtype.is_float() {
        return Err(Error::msg(format!(
            "rotary_tables: {dtype} is not a float dtype"
        )));
    }
    let mut values: Vec<i64> = axes.iter().flat_map(|a| a.iter().copied()).collect();
    values.sort_unstable();
    values.dedup();
    // [value][f] for each distinct position value, in f32, then rounded to `dtype` by
    // `to_dtype`, as the per-row tables were (bf16's `from_f64` rounds differently from
    // `from_f32` for ~1 value in 10⁴).
    let (mut ctf, mut stf) = (
        vec![0f32; values.len() * half],
        vec![0f32; values.len() * half],
    );
    ctf.par_chunks_mut(half.max(1))
        .zip(stf.par_chunks_mut(half.max(1)))
        .zip(&values)
        .for_each(|((c, s), &p)| {
            for ((c, s), &w) in c.iter_mut().zip(s.iter_mut()).zip(freqs) {
                let angle = p as f32 * w;
                (*c, *s) = (angle.cos(), angle.sin());
            }
        });
    let n = ctf.len();
    let ct = Tensor::from_vec(ctf, &[n])?.to_dtype(dtype)?;
    let st = Tensor::from_vec(stf, &[n])?.to_dtype(dtype)?;
    crate::any_dispatch!(dtype, T => {
        let zero = T::from_f64(0.0);
        let (ct, st) = (ct.to_vec::<T>()?, st.to_vec::<T>()?);
        // Rows in chunks of 64 a task; each row finds its axes' values once.
        let width = 2 * half;
        let (mut cos, mut sin) = (vec![zero; rows * width], vec![zero; rows * width]);
        const CHUNK: usize = 64;
        cos.par_chunks_mut(CHUNK * width.max(1))
            .zip(sin.par_chunks_mut(CHUNK * width.max(1)))
            .enumerate()
            .for_each(|(chunk, (cs, ss))| {
                let mut at = [0usize; MAX_AXES];
                for (i, (c, s)) in cs.chunks_mut(width).zip(ss.chunks_mut(width)).enumerate() {
                    let r = chunk * CHUNK + i;
                    for (slot, a) in at.iter_mut().zip(axes) {
                        *slot = values.binary_search(&a[r]).expect("a collected value") * half;
                    }
                    for (f, &a) in axis_of.iter().enumerate() {
                        let i = at[a] + f;
                        (c[f], c[half + f]) = (ct[i], ct[i]);
                        (s[f], s[half + f]) = (st[i], st[i]);
                    }
                }
            });
        Ok((Tensor::from_vec(cos, shape)?, Tensor::from_vec(sin, shape)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    /// The tables as the per-row formula gives them: a cos/sin of each row's f32 angle,
    /// rounded to `dtype` by `to_dtype`.
    fn per_row(
        axes: &[&[i64]],
        axis_of: &[usize],
        freqs: &[f32],
        dtype: DType,
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        (0..axes[0].len()).for_each(|r| {
            let angles: Vec<f32> = axis_of
                .iter()
                .zip(freqs)
                .map(|(&a, &w)| axes[a][r] as f32 * w)
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        });
        let round = |v: Vec<f32>| {
            let n = v.len();
            Tensor::from_vec(v, &[n])
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_f64s()
                .unwrap()
        };
        (round(cos), round(sin))
    }

    #[test]
    fn rotary_tables_equal_a_cos_and_sin_a_row() {
        // M-RoPE over text and two images (three axes), and the vision layout (two axes,
        // the frequencies repeated), in every float dtype: the same bits as the per-row formula.
        let (hd, theta) = (16, 1e6);
        let inv = inv_freq_f32(theta, hd);
        let t: Vec<i64> = (0..40)
            .map(|i| if i < 30 { i } else { 30 + i / 7 })
            .collect();
        let h: Vec<i64> = (0..40).map(|i| (i * 37 % 11) + 3).collect();
        let w: Vec<i64> = (0..40).map(|i| (i * 13 % 9) + 1000).collect();
        let text_axis: Vec<usize> = (0..hd / 2).map(|f| [0, 0, 1, 1, 1, 2, 2, 2][f]).collect();
        let vinv = inv_freq_f32(10000.0, hd / 2);
        let vfreqs: Vec<f32> = vinv.iter().chain(&vinv).copied().collect();
        let vaxis: Vec<usize> = (0..hd / 2).map(|f| f / vinv.len()).collect();
        type Case<'a> = (&'a [&'a [i64]], &'a [usize], &'a [f32]);
        let cases: [Case; 2] = [
            (&[&t, &h, &w], &text_axis, &inv),
            (&[&h, &w], &vaxis, &vfreqs),
        ];
        for (axes, axis_of, freqs) in cases {
            for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
                let (c, s) = rotary_tables(axes, axis_of, freqs, &[40, hd], dtype).unwrap();
                assert_eq!(c.dtype(), dtype);
                let (ec, es) = per_row(axes, axis_of, freqs, dtype);
                assert_eq!(c.to_f64s().unwrap(), ec, "cos, {dtype}");
                assert_eq!(s.to_f64s().unwrap(), es, "sin, {dtype}");
            }
        }
        // Many distinct positions (20000 rows, ~10⁵ cos/sin values a table): the rounding to
        // bf16 / f16 of every value is that of `to_dtype` (bf16's `from_f64` differs from
        // `from_f32` for ~1 value in 10⁴).
        let n = 20000;
        let t: Vec<i64> = (0..n as i64).collect();
        let h: Vec<i64> = t.iter().map(|&i| i / 3).collect();
        let w: Vec<i64> = t.iter().map(|&i| i * 7 % 5000).collect();
        for dtype in [DType::BF16, DType::F16] {
            let axes: [&[i64]; 3] = [&t, &h, &w];
            let (c, s) = rotary_tables(&axes, &text_axis, &inv, &[n, hd], dtype).unwrap();
            let (ec, es) = per_row(&axes, &text_axis, &inv, dtype);
            assert!(c.to_f64s().unwrap() == ec, "cos, {dtype}, many positions");
            assert!(s.to_f64s().unwrap() == es, "sin, {dtype}, many positions");
        }
        let e = rotary_tables(
            &[&t[..40], &h[..39]],
            &[0, 1],
            &inv[..2],
            &[40, 4],
            DType::F32,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("rotary_tables"), "{e}");
    }
}
