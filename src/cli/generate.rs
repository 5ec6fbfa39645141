//! `tessera generate`: continue a chat prompt (optionally with one image) from a Qwen2.5-VL
//! model directory with the KV-cache generator; the text goes to stdout, tokens/s to stderr.
//!
//! `--bench B` instead times greedy generation for a batch of B random prompts (no tokenizer
//! needed) and prints JSON, the counterpart of tools/bench/generate_torch.py.

use crate::qwen2_5_vl::generate::{generate, Prompt, SamplingConfig};
use crate::qwen2_5_vl::preprocess::{load_and_preprocess, PreprocessConfig};
use crate::qwen2_5_vl::tokenizer::QwenTokenizer;
use crate::qwen2_5_vl::QwenVl;
use crate::{DType, Device, Error, Result, Rng};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model directory: config.json + model.safetensors (or a sharded index).
    #[arg(long)]
    model: PathBuf,
    /// PNG, JPEG or WebP shown before the prompt (optional: text-only without it).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The user's message.
    #[arg(long, required_unless_present = "bench")]
    prompt: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// 1.0 = off.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// tokenizer.json (default: DIR/tokenizer.json).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or bf16 with --device cuda (the weights loaded in f32, then cast).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Time greedy generation of max_new_tokens for a batch of this many random prompts of
    /// --bench-prompt-len tokens; prints JSON to stdout.
    #[arg(long)]
    bench: Option<usize>,
    #[arg(long, default_value_t = 32)]
    bench_prompt_len: usize,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if !a.model.is_dir() {
        return Err(Error::file(&a.model, "model directory not found"));
    }
    let device: Device = a.device.parse()?;
    let dtype: DType = a.dtype.parse()?;
    dtype
        .check_compute_on(device, "--device cuda")
        .map_err(|why| Error::msg(format!("--dtype {dtype}: {why}")))?;
    let load = || -> Result<QwenVl> {
        let t = Instant::now();
        let model = QwenVl::load(&a.model, DType::F32)?.to_device(device)?;
        let model = crate::no_grad(|| model.cast(dtype))?;
        eprintln!(
            "loaded {} in {:.2} s",
            a.model.display(),
            t.elapsed().as_secs_f64()
        );
        Ok(model)
    };
    if let Some(batch) = a.bench {
        return bench(
            &load()?,
            batch,
            a.bench_prompt_len,
            a.max_new_tokens,
            a.seed,
        );
    }
    let tokenizer_path = a
        .tokenizer
        .clone()
        .unwrap_or_else(|| a.model.join("tokenizer.json"));
    if !tokenizer_path.is_file() {
        return Err(Error::file(
            &tokenizer_path,
            "tokenizer not found (give --tokenizer FILE)",
        ));
    }
    let tokenizer = QwenTokenizer::from_file(&tokenizer_path)?;
    if let Some(path) = &a.image {
        if !path.is_file() {
            return Err(Error::file(path, "image not found"));
        }
    }
    let model = load()?;
    let merge = model.config.vision.spatial_merge_size;
    let (pixel_values, grids) = match &a.image {
        Some(path) => {
            let cfg = PreprocessConfig {
                merge_size: merge,
                patch_size: model.config.vision.patch_size,
                temporal_patch_size: model.config.vision.temporal_patch_size,
                ..Default::default()
            };
            let img = load_and_preprocess(path, &cfg)?;
            (Some(img.pixel_values), vec![img.grid_thw])
        }
        None => (None, Vec::new()),
    };
    let text = a.prompt.as_deref().unwrap_or_default();
    let input_ids = tokenizer.encode_user_prompt(&grids, text, merge)?;
    let cfg = SamplingConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        stop_ids: tokenizer.special().stop_ids().to_vec(),
    };
    let prompt = Prompt {
        input_ids,
        pixel_values,
        image_grid_thw: grids,
    };
    let n_prompt = prompt.input_ids.len();
    let t = Instant::now();
    let out = generate(&model, &[prompt], &cfg, &mut Rng::new(a.seed))?;
    let secs = t.elapsed().as_secs_f64();
    let g = out
        .into_iter()
        .next()
        .ok_or_else(|| Error::msg("generate returned no result"))?;
    println!("{}", tokenizer.decode(&g.tokens, true)?);
    eprintln!(
        "{n_prompt} prompt tokens, {} new tokens{} in {secs:.2} s ({:.1} tokens/s)",
        g.tokens.len(),
        if g.finished { " (stopped)" } else { "" },
        g.tokens.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Greedy generation of `new_tokens` for `batch` random text prompts of `prompt_len` tokens,
/// no stop ids (every row runs to the end). One warm-up run, then the median of three.
fn bench(
    model: &QwenVl,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    seed: u64,
) -> Result<()> {
    if batch == 0 || prompt_len == 0 || new_tokens == 0 {
        return Err(Error::msg(
            "--bench: batch, --bench-prompt-len and --max-new-tokens must be positive",
        ));
    }
    let mut rng = Rng::new(seed);
    // Ordinary tokens: among the first 2000 ids (below Qwen's special ones), without the
    // config's image/video/vision markers (the tiny preset puts them at 3..6).
    let special = model.config.vision_token_ids();
    let vocab = model.config.text.vocab_size.clamp(2, 2000) as u64;
    if (1..vocab).all(|t| special.contains(&(t as i64))) {
        return Err(Error::msg(format!(
            "--bench: the vocabulary ({vocab} ids) has no ordinary token to prompt with"
        )));
    }
    let mut token = || loop {
        let t = 1 + rng.below(vocab - 1) as u32;
        if !special.contains(&(t as i64)) {
            return t;
        }
    };
    let prompts: Vec<Prompt> = (0..batch)
        .map(|_| Prompt::text((0..prompt_len).map(|_| token()).collect()))
        .collect();
    let cfg = SamplingConfig::greedy(new_tokens);
    let mut times = Vec::new();
    for _ in 0..4 {
        let t = Instant::now();
        let out = generate(model, &prompts, &cfg, &mut rng)?;
        times.push(t.elapsed().as_secs_f64());
        let n: usize = out.iter().map(|g| g.tokens.len()).sum();
        if n != batch * new_tokens {
            return Err(Error::msg(format!(
                "--bench: generated {n} tokens, expected {}",
                batch * new_tokens
            )));
        }
    }
    let mut timed = times[1..].to_vec();
    timed.sort_by(f64::total_cmp);
    let median = timed[timed.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "batch": batch,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "seconds_median": median,
            "tokens_per_s": (batch * new_tokens) as f64 / median,
            "threads": rayon::current_num_threads(),
        })
    );
    Ok(())
}
