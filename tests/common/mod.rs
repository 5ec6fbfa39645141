//! Helpers shared by the Qwen2.5-VL integration tests.

use std::path::Path;
use tessera::io::TensorFile;
use tessera::qwen2_5_vl::Batch;

/// The batch of a parity fixture (inputs.safetensors in the CLI contract's names).
pub fn load_batch(dir: &Path) -> Batch {
    let f = TensorFile::open(dir.join("inputs.safetensors")).unwrap();
    let get = |n: &str| {
        if f.contains(n) {
            Some(f.get(n).unwrap())
        } else {
            None
        }
    };
    let grids = get("image_grid_thw")
        .map(|g| {
            g.to_vec::<i64>()
                .unwrap()
                .chunks(3)
                .map(|c| [c[0] as usize, c[1] as usize, c[2] as usize])
                .collect()
        })
        .unwrap_or_default();
    Batch {
        input_ids: get("input_ids"),
        attention_mask: get("attention_mask"),
        pixel_values: get("pixel_values"),
        image_grid_thw: grids,
        labels: get("labels"),
    }
}
