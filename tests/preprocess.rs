//! Qwen2.5-VL image preprocessing against transformers' slow (PIL) Qwen2-VL image processor.
//!
//! Fixtures: tests/fixtures/preprocess/<case>.safetensors, written by
//! tools/parity/make_preprocess_fixtures.py, each holding the processor's `pixel_values`
//! F32 [N, 1176] and `image_grid_thw` I64 [1, 3] for the image named in its metadata, processed
//! with the metadata's `min_pixels` / `max_pixels`.

use std::path::{Path, PathBuf};

use tessera::io::TensorFile;
use tessera::qwen2_5_vl::preprocess::{
    load_and_preprocess, preprocess_image, smart_resize, PreprocessConfig,
};

/// Max |ours - transformers| allowed on normalised values: about 2 intensity levels
/// (one level is 1 / (255 * std) ~ 0.015).
const TOLERANCE: f32 = 0.03;

/// 4:2:0 JPEGs: the image crate (zune-jpeg) and PIL's libjpeg-turbo upsample chroma
/// differently, up to ~7 levels at colour edges before resizing. Everything after decoding is
/// exact, so this covers the decoder gap only.
const TOLERANCE_JPEG_420: f32 = 0.1;

fn tolerance(image: &str) -> f32 {
    if image.ends_with(".jpg") && image.contains("_420_") {
        TOLERANCE_JPEG_420
    } else {
        TOLERANCE
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

fn fixture_cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    cases.sort();
    cases
}

/// Normalised value back to its 8-bit intensity (exact for values the pipeline produced).
fn level(v: f32, channel: usize, cfg: &PreprocessConfig) -> i32 {
    ((v * cfg.image_std[channel] + cfg.image_mean[channel]) * 255.0).round() as i32
}

#[test]
fn pixel_values_match_transformers_on_every_fixture() {
    let cases = fixture_cases();
    assert!(
        cases.len() >= 10,
        "expected >= 10 fixtures, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let expected = TensorFile::open(case).unwrap();
        let meta = expected.metadata();
        let image = fixture_dir().join(&meta["image"]);
        let cfg = PreprocessConfig {
            min_pixels: meta["min_pixels"].parse().unwrap(),
            max_pixels: meta["max_pixels"].parse().unwrap(),
            ..PreprocessConfig::default()
        };
        let ours = load_and_preprocess(&image, &cfg).unwrap();

        let grid: Vec<i64> = expected.get("image_grid_thw").unwrap().to_vec().unwrap();
        let grid: Vec<usize> = grid.iter().map(|&g| g as usize).collect();
        assert_eq!(
            ours.grid_thw.as_slice(),
            grid.as_slice(),
            "{}",
            image.display()
        );

        let want_tensor = expected.get("pixel_values").unwrap();
        assert_eq!(
            ours.pixel_values.shape(),
            want_tensor.shape(),
            "{}",
            image.display()
        );
        let want: Vec<f32> = want_tensor.to_vec().unwrap();
        let got: Vec<f32> = ours.pixel_values.to_vec().unwrap();
        let patch_area = cfg.patch_size * cfg.patch_size;
        let (mut max_abs, mut max_levels, mut n_diff) = (0f32, 0i32, 0usize);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let channel = (i % cfg.patch_dim()) / (cfg.temporal_patch_size * patch_area);
            max_abs = max_abs.max((g - w).abs());
            let d = (level(g, channel, &cfg) - level(w, channel, &cfg)).abs();
            max_levels = max_levels.max(d);
            n_diff += (d != 0) as usize;
        }
        eprintln!(
            "{:<42} grid {:?}: max |diff| {max_abs:.3e} ({max_levels} levels, {n_diff} of {} \
             values differ)",
            meta["image"],
            ours.grid_thw,
            want.len()
        );
        let allowed = tolerance(&meta["image"]);
        if max_abs > allowed {
            failures.push(format!(
                "{}: max |diff| {max_abs} > {allowed}",
                image.display()
            ));
        }
    }
    assert!(failures.is_empty(), "over tolerance: {failures:?}");
}

#[test]
fn png_fixtures_are_bit_identical() {
    // Lossless input leaves only our code between the file and the result: the PIL resampler
    // (pass order included), compositing and normalisation are replicated exactly, so every
    // value must agree.
    for case in fixture_cases() {
        let expected = TensorFile::open(&case).unwrap();
        let meta = expected.metadata();
        if !meta["image"].ends_with(".png") {
            continue;
        }
        let cfg = PreprocessConfig {
            min_pixels: meta["min_pixels"].parse().unwrap(),
            max_pixels: meta["max_pixels"].parse().unwrap(),
            ..PreprocessConfig::default()
        };
        let ours = load_and_preprocess(&fixture_dir().join(&meta["image"]), &cfg).unwrap();
        let want: Vec<f32> = expected.get("pixel_values").unwrap().to_vec().unwrap();
        let got: Vec<f32> = ours.pixel_values.to_vec().unwrap();
        assert!(got == want, "{} differs from transformers", meta["image"]);
    }
}

#[test]
fn smart_resize_reference_examples() {
    let cfg = PreprocessConfig::default();
    let resize = |h, w| smart_resize(h, w, 28, cfg.min_pixels, cfg.max_pixels).unwrap();
    assert_eq!(resize(70, 98), (56, 112));
    assert_eq!(resize(42, 42), (56, 56));
    assert_eq!(resize(768, 1024), (756, 1036));
    // Round half to even: 42 / 28 = 1.5 -> 2, 70 / 28 = 2.5 -> 2.
    assert_eq!(smart_resize(70, 42, 28, 0, usize::MAX).unwrap(), (56, 56));
    // Capped by max_pixels: 300x400 -> 84x112 under 12000 pixels.
    assert_eq!(smart_resize(300, 400, 28, 3136, 12000).unwrap(), (84, 112));
    // Raised to min_pixels: 40x50 -> 84x112 for 8000 pixels.
    assert_eq!(smart_resize(40, 50, 28, 8000, 12845056).unwrap(), (84, 112));
}

#[test]
fn smart_resize_rejects_aspect_ratio_over_200() {
    let err = smart_resize(10, 2010, 28, 3136, 12845056).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("aspect ratio") && msg.contains("10x2010"),
        "{msg}"
    );
    // Exactly 200 is allowed.
    assert!(smart_resize(10, 2000, 28, 3136, 12845056).is_ok());
    assert!(smart_resize(0, 10, 28, 3136, 12845056).is_err());
}

#[test]
fn grid_and_shape_follow_the_resized_size() {
    let img = image::DynamicImage::new_rgb8(98, 70);
    let out = preprocess_image(&img, &PreprocessConfig::default()).unwrap();
    assert_eq!(out.grid_thw, [1, 4, 8]);
    assert_eq!(out.pixel_values.shape(), &[32, 1176]);
}

#[test]
fn undecodable_file_is_an_error_naming_it() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("preprocess");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("garbage.png");
    std::fs::write(&path, b"\x89PNG\r\n\x1a\nthis is not an image at all").unwrap();
    let msg = load_and_preprocess(&path, &PreprocessConfig::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("garbage.png"), "{msg}");

    let missing = dir.join("does_not_exist.jpg");
    let msg = load_and_preprocess(&missing, &PreprocessConfig::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("does_not_exist.jpg"), "{msg}");
}
