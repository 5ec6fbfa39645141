//! The generation fixtures of tools/parity/make_generate_fixtures.py (a tiny random model and
//! left-padded batches with and without images, with transformers' greedy tokens), read for
//! tests/generate.rs and tests/cuda_train.rs (`#[path]`-included where used).

use std::path::{Path, PathBuf};
use tessera::io::TensorFile;
use tessera::qwen2_5_vl::generate::Prompt;
use tessera::qwen2_5_vl::QwenVl;
use tessera::DType;

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generate")
}

pub fn model() -> QwenVl {
    QwenVl::load(&fixture_dir().join("model"), DType::F32).unwrap()
}

/// The prompts of a fixture case (padding removed, each image's pixels given to the row whose
/// image-token run it fills) and transformers' new tokens per row.
pub fn case(name: &str, model: &QwenVl) -> (Vec<Prompt>, Vec<Vec<u32>>) {
    let f = TensorFile::open(fixture_dir().join(format!("{name}.safetensors"))).unwrap();
    let ids = f.get("input_ids").unwrap();
    let (b, t) = (ids.dim(0).unwrap(), ids.dim(1).unwrap());
    let ids = ids.to_vec::<i64>().unwrap();
    let mask = f.get("attention_mask").unwrap().to_vec::<i64>().unwrap();
    let grids: Vec<[usize; 3]> = if f.contains("image_grid_thw") {
        f.get("image_grid_thw")
            .unwrap()
            .to_vec::<i64>()
            .unwrap()
            .chunks(3)
            .map(|c| [c[0] as usize, c[1] as usize, c[2] as usize])
            .collect()
    } else {
        Vec::new()
    };
    let pixels = f
        .contains("pixel_values")
        .then(|| f.get("pixel_values").unwrap());
    let img = model.config.image_token_id;
    let (mut next_grid, mut next_pixel_row) = (0, 0);
    let mut prompts = Vec::new();
    for r in 0..b {
        let row: Vec<u32> = (0..t)
            .filter(|&i| mask[r * t + i] != 0)
            .map(|i| ids[r * t + i] as u32)
            .collect();
        let runs = row
            .windows(2)
            .filter(|w| w[0] as i64 != img && w[1] as i64 == img)
            .count();
        let my_grids = grids[next_grid..next_grid + runs].to_vec();
        next_grid += runs;
        let n_rows: usize = my_grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let pixel_values = (n_rows > 0).then(|| {
            let p = pixels
                .as_ref()
                .unwrap()
                .narrow(0, next_pixel_row, n_rows)
                .unwrap()
                .contiguous()
                .unwrap();
            next_pixel_row += n_rows;
            p
        });
        prompts.push(Prompt {
            input_ids: row,
            pixel_values,
            image_grid_thw: my_grids,
        });
    }
    assert_eq!(next_grid, grids.len());
    let expected = f.get("expected").unwrap();
    let n = expected.dim(1).unwrap();
    let expected = expected
        .to_vec::<i64>()
        .unwrap()
        .chunks(n)
        .map(|c| c.iter().map(|&x| x as u32).collect())
        .collect();
    (prompts, expected)
}
