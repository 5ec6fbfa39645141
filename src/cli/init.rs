//! `tessera init`: a model directory with random weights for a config (tests, benchmarks,
//! and the starting point of a model trained from scratch).

use crate::qwen2_5_vl::{weights, Config};
use crate::{DType, Error, Result, Rng};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct InitArgs {
    /// A Qwen2.5-VL config.json (e.g. models/qwen2.5-vl-3b/config.json).
    #[arg(long)]
    config: PathBuf,
    /// Output directory (config.json + model.safetensors, official tensor names).
    #[arg(long)]
    out: PathBuf,
    /// On-disk dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: InitArgs) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        d => return Err(Error::msg(format!("--dtype {d}: want f32, bf16 or f16"))),
    };
    let text = std::fs::read_to_string(&a.config)
        .map_err(|e| Error::file(&a.config, format!("cannot read: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&a.config, format!("invalid JSON: {e}")))?;
    let config = Config::from_json(&json).map_err(|e| Error::file(&a.config, e.to_string()))?;
    let t = std::time::Instant::now();
    let params = weights::random_params(&config, dtype, &mut Rng::new(a.seed))?;
    weights::save_model_dir(&a.out, &json, &params, dtype)?;
    eprintln!(
        "wrote {} parameters ({} tensors, {}) to {} in {:.1} s",
        params.numel(),
        params.len(),
        dtype,
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
