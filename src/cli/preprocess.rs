//! `tessera preprocess`: an image file to `pixel_values` F32 [N, 1176] and `image_grid_thw`
//! I64 [1, 3], as transformers' Qwen2-VL image processor computes them.

use crate::qwen2_5_vl::preprocess::{load_and_preprocess, PreprocessConfig};
use crate::{Result, Tensor};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PreprocessArgs {
    /// PNG, JPEG or WebP.
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    min_pixels: Option<usize>,
    #[arg(long)]
    max_pixels: Option<usize>,
}

pub fn run(a: PreprocessArgs) -> Result<()> {
    let mut cfg = PreprocessConfig::default();
    if let Some(n) = a.min_pixels {
        cfg.min_pixels = n;
    }
    if let Some(n) = a.max_pixels {
        cfg.max_pixels = n;
    }
    let p = load_and_preprocess(&a.image, &cfg)?;
    let grid = Tensor::from_vec(
        p.grid_thw.iter().map(|&x| x as i64).collect::<Vec<_>>(),
        &[1, 3],
    )?;
    crate::io::save(
        &a.out,
        &[("pixel_values", &p.pixel_values), ("image_grid_thw", &grid)],
        None,
    )?;
    eprintln!(
        "{}: grid {:?}, pixel_values {:?} -> {}",
        a.image.display(),
        p.grid_thw,
        p.pixel_values.shape(),
        a.out.display()
    );
    Ok(())
}
