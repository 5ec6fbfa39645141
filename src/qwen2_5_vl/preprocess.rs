//! Image preprocessing (smart_resize, PIL-matching bicubic, normalise, patchify).
//!
//! Computes what transformers' slow Qwen2-VL image processor (`Qwen2VLImageProcessorPil`,
//! called `Qwen2VLImageProcessor` before transformers 5) computes, in the same order:
//!
//! 1. decode, then `convert_to_rgb`: transparency composited on opaque white with PIL's
//!    `alpha_composite` integer arithmetic, grayscale and palette expanded to RGB;
//! 2. `smart_resize` to sides divisible by `patch_size * merge_size` (28);
//! 3. PIL `Image.resize(..., BICUBIC)` on the 8-bit image: separable, antialiased when
//!    downscaling, 22-bit fixed-point coefficients, 8-bit intermediate between the passes
//!    (pass order as in Pillow 13, see [`resize_bicubic`]);
//! 4. rescale by 1/255 (in f64, then f32) and normalise `(x - mean) / std` in f32;
//! 5. flatten into `[gh * gw, 3 * 2 * 14 * 14]` rows, the frame duplicated to the temporal
//!    patch size.
//!
//! On the fixtures in tests/fixtures/preprocess the result is bit-identical to transformers
//! for PNG input; lossy formats differ only where the image crate's decoders do from
//! libjpeg-turbo / libwebp.

use std::path::Path;

use image::DynamicImage;
use rayon::prelude::*;

use crate::{Error, Result, Tensor};

/// `preprocessor_config.json` of Qwen2.5-VL. `Default` gives the released values.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Lower bound on resized `h * w` (56 * 56).
    pub min_pixels: usize,
    /// Upper bound on resized `h * w` (28 * 28 * 16384).
    pub max_pixels: usize,
    /// Side of a vision patch in pixels (14).
    pub patch_size: usize,
    /// Frames per patch; an image is repeated to fill them (2).
    pub temporal_patch_size: usize,
    /// Side of the square of patches merged into one LLM token (2).
    pub merge_size: usize,
    /// Per-channel RGB mean, on the 0..1 scale (OpenAI CLIP).
    pub image_mean: [f32; 3],
    /// Per-channel RGB standard deviation, on the 0..1 scale (OpenAI CLIP).
    pub image_std: [f32; 3],
}

impl Default for PreprocessConfig {
    // The CLIP constants verbatim as transformers writes them; they round to the same f32.
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        PreprocessConfig {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 16384,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
        }
    }
}

impl PreprocessConfig {
    /// Resized sides are multiples of this: `patch_size * merge_size` (28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Columns of `pixel_values`: `3 * temporal_patch_size * patch_size^2` (1176).
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    fn validate(&self) -> Result<()> {
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            return Err(Error::msg(format!(
                "preprocess: patch_size ({}), merge_size ({}) and temporal_patch_size ({}) must be \
                 positive",
                self.patch_size, self.merge_size, self.temporal_patch_size
            )));
        }
        if self.image_std.contains(&0.0) {
            return Err(Error::msg(format!(
                "preprocess: image_std {:?} has a zero entry",
                self.image_std
            )));
        }
        Ok(())
    }
}

/// The model input for one image.
#[derive(Debug, Clone)]
pub struct PreprocessedImage {
    /// F32 `[gh * gw, 3 * temporal_patch_size * patch_size^2]` (`[N, 1176]`). Rows run in
    /// raster order over `merge_size x merge_size` blocks of patches, each block's patches
    /// contiguous; columns are `(channel, frame, py, px)`, matching
    /// `patch_embed.proj.weight.reshape(1280, 1176)`.
    pub pixel_values: Tensor,
    /// `[t, gh, gw]` = `[1, resized_h / patch_size, resized_w / patch_size]`.
    pub grid_thw: [usize; 3],
}

/// Target `(height, width)`: both divisible by `factor`, `h * w` within
/// `[min_pixels, max_pixels]`, aspect ratio kept as closely as possible. The f64 arithmetic,
/// round-half-to-even and order of operations follow transformers' `smart_resize`, so sizes
/// agree exactly. Examples (h x w, factor 28, default bounds): 70x98 -> 56x112,
/// 42x42 -> 56x56, 768x1024 -> 756x1036.
///
/// Errors when a side is zero, `factor` is zero, or the aspect ratio exceeds 200.
pub fn smart_resize(
    h: usize,
    w: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if h == 0 || w == 0 {
        return Err(Error::msg(format!(
            "smart_resize: image of {h}x{w} (h x w) has an empty side"
        )));
    }
    if factor == 0 {
        return Err(Error::msg("smart_resize: factor must be positive"));
    }
    let (hf, wf, f) = (h as f64, w as f64, factor as f64);
    let aspect = hf.max(wf) / hf.min(wf);
    if aspect > 200.0 {
        return Err(Error::msg(format!(
            "smart_resize: absolute aspect ratio must be at most 200, got {aspect} for a {h}x{w} \
             (h x w) image"
        )));
    }
    let mut h_bar = (hf / f).round_ties_even() * f;
    let mut w_bar = (wf / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        h_bar = f.max((hf / beta / f).floor() * f);
        w_bar = f.max((wf / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        h_bar = (hf * beta / f).ceil() * f;
        w_bar = (wf * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Decodes `path` (PNG, JPEG or WebP, format guessed from the content) and preprocesses it.
/// A missing or undecodable file is an error naming the file. EXIF orientation is not
/// applied, as with `PIL.Image.open`.
pub fn load_and_preprocess(path: &Path, cfg: &PreprocessConfig) -> Result<PreprocessedImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::file(path, format!("cannot open image: {e}")))?
        .with_guessed_format()
        .map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
    let img = reader
        .decode()
        .map_err(|e| Error::file(path, format!("cannot decode image: {e}")))?;
    preprocess_image(&img, cfg)
}

/// Preprocesses a decoded image: RGB conversion, smart_resize, PIL bicubic resize, rescale,
/// normalise, patchify. See [`PreprocessedImage`] for the layout.
pub fn preprocess_image(img: &DynamicImage, cfg: &PreprocessConfig) -> Result<PreprocessedImage> {
    cfg.validate()?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let (out_h, out_w) = smart_resize(height, width, cfg.factor(), cfg.min_pixels, cfg.max_pixels)?;
    let rgb = convert_to_rgb(img);
    let resized = resize_bicubic(&rgb, height, width, out_h, out_w)?;
    let normalized = rescale_and_normalize(&resized, out_h, out_w, cfg);
    let pixel_values = patchify(&normalized, out_h, out_w, cfg);
    let (grid_h, grid_w) = (out_h / cfg.patch_size, out_w / cfg.patch_size);
    Ok(PreprocessedImage {
        pixel_values: Tensor::from_vec(pixel_values, &[grid_h * grid_w, cfg.patch_dim()])?,
        grid_thw: [1, grid_h, grid_w],
    })
}

// ---------------------------------------------------------------------------------------------
// RGB conversion
// ---------------------------------------------------------------------------------------------

/// transformers' `convert_to_rgb` on a PIL image: images with alpha go through
/// `alpha_composite(white, image)`, the rest through `convert("RGB")`. Returns interleaved
/// RGB, `[h, w, 3]` u8.
///
/// 16-bit inputs follow PIL's decoders: RGB(A)/LA keep the high byte, while 16-bit grayscale
/// (PIL mode `I;16`) is clipped to 255 by PIL's `I;16 -> RGB` conversion, not scaled.
fn convert_to_rgb(img: &DynamicImage) -> Vec<u8> {
    match img {
        DynamicImage::ImageRgb8(im) => im.as_raw().clone(),
        DynamicImage::ImageLuma8(im) => im.as_raw().iter().flat_map(|&l| [l, l, l]).collect(),
        DynamicImage::ImageRgba8(im) => composite_rgba(
            im.as_raw()
                .chunks_exact(4)
                .map(|p| [p[0], p[1], p[2], p[3]]),
        ),
        DynamicImage::ImageLumaA8(im) => composite_rgba(
            im.as_raw()
                .chunks_exact(2)
                .map(|p| [p[0], p[0], p[0], p[1]]),
        ),
        DynamicImage::ImageLuma16(im) => im
            .as_raw()
            .iter()
            .flat_map(|&l| {
                let l = l.min(255) as u8;
                [l, l, l]
            })
            .collect(),
        DynamicImage::ImageRgb16(im) => im.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(im) => composite_rgba(
            im.as_raw()
                .chunks_exact(4)
                .map(|p| [p[0], p[1], p[2], p[3]].map(|v| (v >> 8) as u8)),
        ),
        DynamicImage::ImageLumaA16(im) => composite_rgba(im.as_raw().chunks_exact(2).map(|p| {
            let (l, a) = ((p[0] >> 8) as u8, (p[1] >> 8) as u8);
            [l, l, l, a]
        })),
        other if other.color().has_alpha() => {
            composite_rgba(other.to_rgba8().pixels().map(|p| p.0))
        }
        other => other.to_rgb8().into_raw(),
    }
}

/// RGBA pixels composited over opaque white, as PIL's `ImagingAlphaComposite` computes it
/// (7 extra precision bits, division by 255 by shifts).
fn composite_rgba(pixels: impl Iterator<Item = [u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(pixels.size_hint().0 * 3);
    for p in pixels {
        let [r, g, b] = composite_on_white(p);
        out.extend_from_slice(&[r, g, b]);
    }
    out
}

/// One pixel of `alpha_composite(dst = (255, 255, 255, 255), src = [r, g, b, a])`.
///
/// PIL: `coef1 = a * 255 * 255 * 128 / outa255`, `coef2 = 255 * 128 - coef1`, with
/// `outa255 = 255 * 255` for an opaque background, so `coef1 = 128 a` exactly; then
/// `out = div255(c * coef1 + 255 * coef2 + (128 << 7)) >> 7`, `div255(x) = ((x >> 8) + x) >> 8`.
/// Checked exhaustively against Pillow 13 over all (value, alpha) pairs.
fn composite_on_white(src: [u8; 4]) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    let alpha = src[3] as u32;
    if alpha == 0 {
        return [255, 255, 255];
    }
    let coef1 = alpha << PRECISION_BITS;
    let coef2 = (255 << PRECISION_BITS) - coef1;
    let blend = |c: u8| {
        let tmp = c as u32 * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
        ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
    };
    [blend(src[0]), blend(src[1]), blend(src[2])]
}

// ---------------------------------------------------------------------------------------------
// PIL bicubic resampling (Pillow 13's libImaging/Resample.c, 8 bits per channel)
// ---------------------------------------------------------------------------------------------

/// Fractional bits of the fixed-point filter weights: 32 - 8 (pixel) - 2 (headroom for the
/// negative lobes and sums above 1), as in PIL.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Keys' cubic convolution kernel with a = -0.5 (PIL's BICUBIC), support 2.
fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The fixed-point weights of a 1-D resample from `in_size` to `out_size` samples: output `i`
/// is `sum_j weights[i * ksize + j] * input[start[i] + j]` over `j < len[i]`.
struct ResampleWeights {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the whole input range
/// (box = `[0, in_size]`). When downscaling, the kernel is stretched by the scale
/// (`support = 2 * scale`), which is the antialiasing.
fn resample_weights(in_size: usize, out_size: usize) -> ResampleWeights {
    // PIL takes the box as f32 and the scale in f64; sides are far below 2^24, so exact.
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filter_scale = 1.0 / filter_scale;

    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut row = vec![0f64; ksize];
    for i in 0..out_size {
        let center = (i as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero; `as i64` does the same.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = hi.saturating_sub(lo);
        let mut total = 0.0;
        for (j, w) in row.iter_mut().enumerate().take(n) {
            *w = bicubic_kernel(((j + lo) as f64 - center + 0.5) * inv_filter_scale);
            total += *w;
        }
        for (j, w) in row.iter().enumerate().take(n) {
            let w = if total != 0.0 { w / total } else { *w };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            // Round half away from zero, then truncate, as PIL does.
            weights[i * ksize + j] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        start.push(lo);
        len.push(n);
    }
    ResampleWeights {
        ksize,
        start,
        len,
        weights,
    }
}

impl ResampleWeights {
    fn out_size(&self) -> usize {
        self.start.len()
    }

    fn of(&self, i: usize) -> (usize, &[i32]) {
        let k = &self.weights[i * self.ksize..i * self.ksize + self.len[i]];
        (self.start[i], k)
    }
}

/// Rounds a fixed-point accumulator (which starts at one half) to 8 bits, clipping to 0..255.
#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL `Image.resize((out_w, out_h), BICUBIC)` of an interleaved RGB u8 image `[h, w, 3]`,
/// giving `[out_h, out_w, 3]`, bit for bit as Pillow 13's `ImagingResampleInner`: two 1-D
/// passes with an 8-bit (rounded, clipped) intermediate; a pass whose size is unchanged is
/// skipped, so equal sizes copy.
///
/// Pass order matters for the result (the intermediate is rounded). Pillow 13 runs the
/// vertical pass first when the height loses more than twice as many pixels as the width
/// (`h - out_h > 2 * (w - out_w)` and `h > out_h`), otherwise horizontal first; Pillow 12
/// and earlier always ran horizontal first, so on such inputs results differ from older
/// Pillow by a few levels.
pub fn resize_bicubic(
    rgb: &[u8],
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
) -> Result<Vec<u8>> {
    if rgb.len() != height * width * 3 {
        return Err(Error::shape(
            "resize_bicubic",
            format!("{} bytes is not a {height}x{width} RGB image", rgb.len()),
        ));
    }
    if height == 0 || width == 0 || out_height == 0 || out_width == 0 {
        return Err(Error::shape(
            "resize_bicubic",
            format!("cannot resize {height}x{width} to {out_height}x{out_width}"),
        ));
    }
    let need_horizontal = out_width != width;
    let need_vertical = out_height != height;
    let height_loss = height as i64 - out_height as i64;
    let width_loss = width as i64 - out_width as i64;
    let vertical_first = height_loss > 0 && height_loss > 2 * width_loss;

    match (need_horizontal, need_vertical) {
        (false, false) => Ok(rgb.to_vec()),
        (true, false) => {
            let horizontal = resample_weights(width, out_width);
            Ok(resample_rows(rgb, width, 0, height, &horizontal))
        }
        (false, true) => {
            let vertical = resample_weights(height, out_height);
            Ok(resample_columns(rgb, width, 0, &vertical))
        }
        (true, true) if vertical_first => {
            let vertical = resample_weights(height, out_height);
            let temp = resample_columns(rgb, width, 0, &vertical);
            let horizontal = resample_weights(width, out_width);
            Ok(resample_rows(&temp, width, 0, out_height, &horizontal))
        }
        (true, true) => {
            // Only source rows first_row..last_row feed the vertical pass.
            let vertical = resample_weights(height, out_height);
            let first_row = vertical.start[0];
            let last_row = vertical.start[out_height - 1] + vertical.len[out_height - 1];
            let horizontal = resample_weights(width, out_width);
            let temp = resample_rows(rgb, width, first_row, last_row - first_row, &horizontal);
            Ok(resample_columns(&temp, out_width, first_row, &vertical))
        }
    }
}

/// Horizontal pass: rows `first_row..first_row + n_rows` of `src` (`[*, width, 3]`)
/// resampled along x to `[n_rows, weights.out_size(), 3]`.
fn resample_rows(
    src: &[u8],
    width: usize,
    first_row: usize,
    n_rows: usize,
    weights: &ResampleWeights,
) -> Vec<u8> {
    let out_width = weights.out_size();
    let mut out = vec![0u8; n_rows * out_width * 3];
    out.par_chunks_mut(out_width * 3)
        .enumerate()
        .for_each(|(y, out_row)| {
            let row = (y + first_row) * width * 3;
            let src_row = &src[row..row + width * 3];
            for (x, out_px) in out_row.chunks_exact_mut(3).enumerate() {
                let (lo, k) = weights.of(x);
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (px, &w) in src_row[lo * 3..].chunks_exact(3).zip(k) {
                    for c in 0..3 {
                        acc[c] += px[c] as i64 * w as i64;
                    }
                }
                for c in 0..3 {
                    out_px[c] = clip8(acc[c]);
                }
            }
        });
    out
}

/// Vertical pass: `src` (`[*, width, 3]`, its row 0 being source row `row_offset`) resampled
/// along y to `[weights.out_size(), width, 3]`.
fn resample_columns(
    src: &[u8],
    width: usize,
    row_offset: usize,
    weights: &ResampleWeights,
) -> Vec<u8> {
    let stride = width * 3;
    let out_height = weights.out_size();
    let mut out = vec![0u8; out_height * stride];
    out.par_chunks_mut(stride)
        .enumerate()
        .for_each(|(y, out_row)| {
            let (lo, k) = weights.of(y);
            let lo = lo - row_offset;
            let mut acc = vec![1i64 << (PRECISION_BITS - 1); stride];
            for (j, &w) in k.iter().enumerate() {
                let src_row = &src[(lo + j) * stride..(lo + j + 1) * stride];
                for (a, &p) in acc.iter_mut().zip(src_row) {
                    *a += p as i64 * w as i64;
                }
            }
            for (o, &a) in out_row.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        });
    out
}

// ---------------------------------------------------------------------------------------------
// Rescale, normalise, patchify
// ---------------------------------------------------------------------------------------------

/// `[h, w, 3]` u8 -> channel-first `[3, h, w]` f32 of `(v / 255 - mean) / std`. As in
/// transformers: `v * (1/255)` in f64 rounded to f32, then the subtraction and division in f32.
fn rescale_and_normalize(
    rgb: &[u8],
    height: usize,
    width: usize,
    cfg: &PreprocessConfig,
) -> Vec<f32> {
    let plane = height * width;
    let mut out = vec![0f32; 3 * plane];
    let rescale = 1.0f64 / 255.0;
    for c in 0..3 {
        let (mean, std) = (cfg.image_mean[c], cfg.image_std[c]);
        for (o, px) in out[c * plane..(c + 1) * plane]
            .iter_mut()
            .zip(rgb.chunks_exact(3))
        {
            let v = (px[c] as f64 * rescale) as f32;
            *o = (v - mean) / std;
        }
    }
    out
}

/// `[3, h, w]` -> `[gh * gw, 3 * tp * p * p]`, the reference's
/// `reshape(gt, tp, c, gh/m, m, p, gw/m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)`: rows
/// ordered `(block_y, block_x, merge_y, merge_x)`, columns `(channel, frame, py, px)`, the
/// single frame repeated `tp` times.
fn patchify(image: &[f32], height: usize, width: usize, cfg: &PreprocessConfig) -> Vec<f32> {
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (grid_h, grid_w) = (height / p, width / p);
    let plane = height * width;
    let mut out = Vec::with_capacity(grid_h * grid_w * cfg.patch_dim());
    for block_y in 0..grid_h / m {
        for block_x in 0..grid_w / m {
            for merge_y in 0..m {
                for merge_x in 0..m {
                    let y0 = (block_y * m + merge_y) * p;
                    let x0 = (block_x * m + merge_x) * p;
                    for c in 0..3 {
                        for _frame in 0..tp {
                            for py in 0..p {
                                let row = c * plane + (y0 + py) * width + x0;
                                out.extend_from_slice(&image[row..row + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (n_in, n_out) in [(20, 56), (70, 56), (1024, 112), (98, 112), (5, 5)] {
            let w = resample_weights(n_in, n_out);
            for i in 0..n_out {
                let sum: i64 = w.of(i).1.iter().map(|&k| k as i64).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= w.ksize as i64,
                    "{n_in}->{n_out} row {i}"
                );
            }
        }
    }

    #[test]
    fn resize_keeps_a_constant_image_constant() {
        let rgb: Vec<u8> = (0..30 * 20).flat_map(|_| [7u8, 128, 250]).collect();
        for (h, w) in [(56, 84), (7, 3), (30, 20)] {
            let out = resize_bicubic(&rgb, 30, 20, h, w).unwrap();
            assert!(out.chunks_exact(3).all(|p| p == [7, 128, 250]), "{h}x{w}");
        }
    }

    #[test]
    fn composite_on_white_ends() {
        assert_eq!(composite_on_white([10, 20, 30, 0]), [255, 255, 255]);
        assert_eq!(composite_on_white([10, 20, 30, 255]), [10, 20, 30]);
        assert_eq!(composite_on_white([0, 0, 0, 128]), [127, 127, 127]);
    }
}
