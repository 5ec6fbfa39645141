//! KV-cache generation: greedy tokens against transformers' `generate` (fixtures by
//! tools/parity/make_generate_fixtures.py: a tiny random model, left-padded batches with and
//! without images), cached decode logits against a full forward, batched against per-row
//! decoding, and the sampling controls (seed, top-k, top-p, stop ids).

use std::path::{Path, PathBuf};
use tessera::qwen2_5_vl::generate::{
    decode_step, generate, generate_groups, pad_prompts, prefill, sample_token, Generation, Prompt,
    SamplingConfig,
};
use tessera::qwen2_5_vl::QwenVl;
use tessera::Rng;

#[path = "common/generate_fixtures.rs"]
mod generate_fixtures;
use generate_fixtures::{case, fixture_dir, model};

fn greedy_matches_transformers(name: &str) {
    let model = model();
    let (prompts, expected) = case(name, &model);
    let cfg = SamplingConfig::greedy(expected[0].len());
    let out = generate(&model, &prompts, &cfg, &mut Rng::new(0)).unwrap();
    for (r, (g, e)) in out.iter().zip(&expected).enumerate() {
        assert_eq!(&g.tokens, e, "{name}: row {r}");
        assert!(!g.finished);
    }
}

#[test]
fn greedy_matches_transformers_with_images_and_padding() {
    greedy_matches_transformers("image");
}

#[test]
fn greedy_matches_transformers_text_only() {
    greedy_matches_transformers("text");
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// At every step the cached decode gives the logits a full forward over the prompt and the
/// tokens so far gives at its last position (same left padding, positions by get_rope_index).
#[test]
fn kv_cache_decode_logits_equal_full_forward() {
    let model = model();
    let (mut prompts, _) = case("image", &model);
    let (mut logits, mut cache) = prefill(&model, &prompts).unwrap();
    let b = prompts.len();
    let mut worst = 0.0f64;
    for step in 0..8 {
        let v = logits.dim(1).unwrap();
        let ours = logits.to_f64s().unwrap();
        let batch = pad_prompts(&model, &prompts).unwrap();
        let full = tessera::no_grad(|| model.forward(&batch)).unwrap().logits;
        let t = full.dim(1).unwrap();
        let theirs = full
            .narrow(1, t - 1, 1)
            .unwrap()
            .reshape(&[b, v])
            .unwrap()
            .to_f64s()
            .unwrap();
        for r in 0..b {
            let e = rel_err(&ours[r * v..(r + 1) * v], &theirs[r * v..(r + 1) * v]);
            assert!(e <= 1e-5, "step {step} row {r}: relative error {e:.3e}");
            worst = worst.max(e);
        }
        let next: Vec<u32> = (0..b)
            .map(|r| {
                sample_token(
                    &ours[r * v..(r + 1) * v],
                    &SamplingConfig::greedy(1),
                    &mut Rng::new(0),
                )
                .unwrap()
            })
            .collect();
        for (p, &tok) in prompts.iter_mut().zip(&next) {
            p.input_ids.push(tok);
        }
        logits = decode_step(&model, &mut cache, &next).unwrap();
    }
    eprintln!("cached vs full forward: worst relative error {worst:.2e}");
}

#[test]
fn batched_rows_equal_rows_alone() {
    let model = model();
    let (prompts, _) = case("image", &model);
    let cfg = SamplingConfig::greedy(10);
    let batched = generate(&model, &prompts, &cfg, &mut Rng::new(0)).unwrap();
    for (r, p) in prompts.iter().enumerate() {
        let alone = generate(&model, std::slice::from_ref(p), &cfg, &mut Rng::new(0)).unwrap();
        assert_eq!(alone[0], batched[r], "row {r}");
    }
}

#[test]
fn groups_equal_the_prompts_repeated() {
    // GRPO's rollouts: each prompt (and its image) through the model once, its cache rows
    // repeated; the tokens of generating from the prompts repeated, sampled and greedy.
    let model = model();
    let (prompts, _) = case("image", &model);
    let repeated: Vec<Prompt> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), 3))
        .collect();
    let sampling = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        stop_ids: vec![9],
    };
    for (i, cfg) in [sampling, SamplingConfig::greedy(8)].iter().enumerate() {
        let want = generate(&model, &repeated, cfg, &mut Rng::new(4)).unwrap();
        let got = generate_groups(&model, &prompts, 3, cfg, &mut Rng::new(4)).unwrap();
        assert_eq!(got, want);
        if i == 0 {
            // The sampled rows of one group differ (the comparison is not of copies).
            assert!(want.chunks(3).any(|g| g[0] != g[1] || g[1] != g[2]));
        }
    }
    assert!(generate_groups(
        &model,
        &prompts,
        0,
        &SamplingConfig::greedy(4),
        &mut Rng::new(0)
    )
    .unwrap()
    .is_empty());
}

fn sampled(model: &QwenVl, prompts: &[Prompt], seed: u64) -> Vec<Generation> {
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        stop_ids: Vec::new(),
    };
    generate(model, prompts, &cfg, &mut Rng::new(seed)).unwrap()
}

#[test]
fn a_seed_reproduces_sampling_and_seeds_differ() {
    let model = model();
    let (prompts, _) = case("image", &model);
    let a = sampled(&model, &prompts, 1);
    assert_eq!(a, sampled(&model, &prompts, 1));
    assert_ne!(a, sampled(&model, &prompts, 2));
    let greedy = generate(
        &model,
        &prompts,
        &SamplingConfig::greedy(12),
        &mut Rng::new(0),
    )
    .unwrap();
    assert_ne!(
        a, greedy,
        "sampling at temperature 1 should leave the argmax path"
    );
}

#[test]
fn top_k_one_equals_greedy() {
    let model = model();
    let (prompts, expected) = case("text", &model);
    let cfg = SamplingConfig {
        max_new_tokens: expected[0].len(),
        temperature: 1.5,
        top_k: 1,
        top_p: 1.0,
        stop_ids: Vec::new(),
    };
    let out = generate(&model, &prompts, &cfg, &mut Rng::new(3)).unwrap();
    let tokens: Vec<Vec<u32>> = out.into_iter().map(|g| g.tokens).collect();
    assert_eq!(tokens, expected);
}

/// A stop id ends exactly the rows that emit it, right after it; the other rows are not
/// disturbed by rows leaving the batch.
#[test]
fn stop_ids_end_a_row() {
    let model = model();
    let (prompts, expected) = case("image", &model);
    // A token row 0 emits at step 3 and not before.
    let stop = expected[0][3];
    assert!(!expected[0][..3].contains(&stop));
    let cfg = SamplingConfig {
        stop_ids: vec![stop],
        ..SamplingConfig::greedy(expected[0].len())
    };
    let out = generate(&model, &prompts, &cfg, &mut Rng::new(0)).unwrap();
    assert_eq!(out[0].tokens, expected[0][..4].to_vec());
    assert!(out[0].finished);
    for (r, (g, e)) in out.iter().zip(&expected).enumerate() {
        match e.iter().position(|&t| t == stop) {
            Some(i) => {
                assert_eq!(g.tokens, e[..=i].to_vec(), "row {r}");
                assert!(g.finished, "row {r}");
            }
            None => {
                assert_eq!(&g.tokens, e, "row {r}");
                assert!(!g.finished, "row {r}");
            }
        }
    }
    // Rows finishing at different steps: stop on row 1's third token as well.
    let cfg = SamplingConfig {
        stop_ids: vec![stop, expected[1][2]],
        ..cfg
    };
    let out = generate(&model, &prompts, &cfg, &mut Rng::new(0)).unwrap();
    for (r, (g, e)) in out.iter().zip(&expected).enumerate() {
        let end = e.iter().position(|t| cfg.stop_ids.contains(t));
        assert_eq!(
            g.tokens,
            e[..end.map_or(e.len(), |i| i + 1)].to_vec(),
            "row {r}"
        );
        assert_eq!(g.finished, end.is_some(), "row {r}");
    }
}

#[test]
fn zero_new_tokens_and_no_prompts() {
    let model = model();
    let (prompts, _) = case("text", &model);
    let out = generate(
        &model,
        &prompts,
        &SamplingConfig::greedy(0),
        &mut Rng::new(0),
    )
    .unwrap();
    assert_eq!(out, vec![Generation::default(); prompts.len()]);
    assert!(
        generate(&model, &[], &SamplingConfig::greedy(4), &mut Rng::new(0))
            .unwrap()
            .is_empty()
    );
    let empty = Prompt::text(Vec::new());
    let err = generate(
        &model,
        &[empty],
        &SamplingConfig::greedy(4),
        &mut Rng::new(0),
    );
    assert!(err.is_err());
}

/// Draw frequencies of `sample_token` over many draws.
fn frequencies(logits: &[f64], cfg: &SamplingConfig, draws: usize) -> Vec<f64> {
    let mut rng = Rng::new(9);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        counts[sample_token(logits, cfg, &mut rng).unwrap() as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / draws as f64).collect()
}

#[test]
fn top_k_top_p_and_temperature_shape_the_distribution() {
    // Probabilities 0.5, 0.3, 0.15, 0.05.
    let logits: Vec<f64> = [0.5f64, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let base = SamplingConfig {
        temperature: 1.0,
        ..SamplingConfig::greedy(1)
    };
    let f = frequencies(&logits, &base, 40000);
    for (got, want) in f.iter().zip([0.5, 0.3, 0.15, 0.05]) {
        assert!((got - want).abs() < 0.01, "{f:?}");
    }
    // top_p 0.7: ascending cumulative 0.05, 0.20 (<= 0.3, dropped), 0.50 (kept): {0, 1}.
    let f = frequencies(
        &logits,
        &SamplingConfig {
            top_p: 0.7,
            ..base.clone()
        },
        40000,
    );
    assert_eq!((f[2], f[3]), (0.0, 0.0), "{f:?}");
    assert!((f[0] - 0.625).abs() < 0.01, "{f:?}");
    // top_p 0.3: only the most likely token.
    let f = frequencies(
        &logits,
        &SamplingConfig {
            top_p: 0.3,
            ..base.clone()
        },
        1000,
    );
    assert_eq!(f[0], 1.0);
    // top_k 3 renormalises over the three largest.
    let f = frequencies(
        &logits,
        &SamplingConfig {
            top_k: 3,
            ..base.clone()
        },
        40000,
    );
    assert_eq!(f[3], 0.0);
    assert!((f[2] - 0.15 / 0.95).abs() < 0.01, "{f:?}");
    // A low temperature sharpens towards the argmax.
    let f = frequencies(
        &logits,
        &SamplingConfig {
            temperature: 0.1,
            ..base
        },
        4000,
    );
    assert!(f[0] > 0.99, "{f:?}");
    // Bad settings are errors, not panics.
    let model = model();
    let (prompts, _) = case("text", &model);
    for bad in [
        SamplingConfig {
            temperature: -1.0,
            ..SamplingConfig::greedy(2)
        },
        SamplingConfig {
            top_p: 0.0,
            ..SamplingConfig::greedy(2)
        },
        SamplingConfig {
            temperature: f64::NAN,
            ..SamplingConfig::greedy(2)
        },
    ] {
        assert!(generate(&model, &prompts, &bad, &mut Rng::new(0)).is_err());
    }
}

// ---------------------------------------------------------------- the `tessera generate` CLI

fn tessera() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// The Qwen tokenizer of ../shared (the full vocabulary), when this checkout has it.
fn qwen_tokenizer() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tokenizers/qwen/tokenizer.json");
    p.is_file().then_some(p)
}

/// A random model directory (made by `tessera init`) whose vocabulary covers the Qwen tokenizer.
fn cli_model_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("generate_cli_model");
    let config = Path::new(env!("CARGO_TARGET_TMPDIR")).join("generate_cli_config.json");
    std::fs::write(
        &config,
        r#"{
  "model_type": "qwen2_5_vl",
  "image_token_id": 151655, "video_token_id": 151656,
  "vision_start_token_id": 151652, "vision_end_token_id": 151653,
  "tie_word_embeddings": true,
  "text_config": {"vocab_size": 151680, "hidden_size": 16, "intermediate_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "rope_parameters": {"type": "mrope", "mrope_section": [2, 1, 1], "rope_theta": 1000000.0}},
  "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 1,
    "in_channels": 3, "out_hidden_size": 16, "patch_size": 14, "spatial_merge_size": 2,
    "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [0]}
}"#,
    )
    .unwrap();
    let out = tessera()
        .arg("init")
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[test]
fn cli_generates_with_and_without_an_image() {
    let Some(tokenizer) = qwen_tokenizer() else {
        eprintln!("skipped: ../shared/tokenizers/qwen/tokenizer.json not found");
        return;
    };
    let dir = cli_model_dir();
    let image =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess/gray_50x60.png");
    for with_image in [true, false] {
        let mut cmd = tessera();
        cmd.arg("generate")
            .arg("--model")
            .arg(&dir)
            .arg("--tokenizer")
            .arg(&tokenizer)
            .args([
                "--prompt",
                "What is in the picture?",
                "--max-new-tokens",
                "6",
            ])
            .args([
                "--temperature",
                "0.7",
                "--top-k",
                "40",
                "--top-p",
                "0.9",
                "--seed",
                "5",
            ]);
        if with_image {
            cmd.arg("--image").arg(&image);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("tokens/s"), "{stderr}");
        // The same seed gives the same text.
        let again = cmd.output().unwrap();
        assert_eq!(out.stdout, again.stdout);
    }
}

#[test]
fn cli_errors_name_the_missing_path() {
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no_such_model_dir");
    let out = tessera()
        .arg("generate")
        .arg("--model")
        .arg(&missing)
        .args(["--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no_such_model_dir"), "{stderr}");

    // A model directory without tokenizer.json, and no --tokenizer.
    let dir = fixture_dir().join("model");
    let out = tessera()
        .arg("generate")
        .arg("--model")
        .arg(&dir)
        .args(["--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokenizer.json"), "{stderr}");

    // bf16 on the CPU, which computes in f32.
    let out = tessera()
        .arg("generate")
        .arg("--model")
        .arg(&dir)
        .args(["--prompt", "hi", "--dtype", "bf16"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--device cuda"), "{stderr}");

    if let Some(tokenizer) = qwen_tokenizer() {
        let out = tessera()
            .arg("generate")
            .arg("--model")
            .arg(&dir)
            .arg("--tokenizer")
            .arg(&tokenizer)
            .args(["--prompt", "hi", "--image", "no_such_image.png"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no_such_image.png"), "{stderr}");
    }
}
