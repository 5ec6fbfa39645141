//! The jobs end to end on CUDA against the same jobs on the CPU. Generation (KV cache) on the
//! device: greedy tokens against transformers' (the generate fixtures) and sampled tokens
//! against the CPU's with the same seed. The trainers with `model.device = "cuda"`: SFT, GRPO
//! (sampled rollouts, a KL term to the frozen reference, two passes over each batch), the
//! evaluation by greedy generation, and a checkpoint resumed on the device; the tiny preset from
//! random weights, in f32, so every step's metrics must match the CPU's: the first step's to
//! f32 rounding, the later ones within what a few Adam steps amplify; and with `model.dtype =
//! "bf16"` (bf16 copies of the f32 weights), SFT within bf16's rounding of the CPU's f32 run
//! and GRPO's steps finite with a signal. Skips without a GPU.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tessera::backend::cuda;
use tessera::qwen2_5_vl::generate::{decode_step, generate, prefill, SamplingConfig};
use tessera::rl::config::TrainConfig;
use tessera::rl::sources;
use tessera::rl::task::Task;
use tessera::rl::trainer::{Kind, Trainer};
use tessera::{DType, Device, Rng};

#[path = "common/generate_fixtures.rs"]
mod generate_fixtures;
use generate_fixtures::{case, model};

#[path = "common/runs.rs"]
mod runs;
use runs::{by_length, metrics};

fn tmp(name: &str) -> PathBuf {
    runs::tmp(&format!("cuda-train-{name}"))
}

/// A small run of the tiny preset from random weights on `device`, evaluated on 4 examples,
/// with completions of up to 6 tokens.
fn config(out: &Path, device: &str, train: &str, steps: u64) -> TrainConfig {
    let mut cfg = runs::config(out, train, steps);
    cfg.model.device = device.into();
    cfg.data.eval_samples = 4;
    cfg.grpo.max_new_tokens = 6;
    cfg
}

/// Trains `cfg` from scratch (or resumes it), with `evals` evaluated at the end. GRPO's rewards
/// are the completions' lengths, so that a random model gets a signal (its answers are never
/// correct).
fn train(kind: Kind, cfg: &TrainConfig, evals: &[&str], resume: bool) {
    let open = |spec: &str| -> Box<dyn Task> { sources::open(spec, cfg).unwrap() };
    let evals = evals.iter().map(|s| open(s)).collect();
    let task = match kind {
        Kind::Grpo => by_length(open(&cfg.data.train), false),
        _ => open(&cfg.data.train),
    };
    Trainer::new(kind, cfg.clone(), task, evals, resume)
        .unwrap_or_else(|e| panic!("{} on {}: {e}", kind.name(), cfg.model.device))
        .train()
        .unwrap_or_else(|e| panic!("{} on {}: {e}", kind.name(), cfg.model.device));
}

/// Each numeric metric in `keys` of every step, CUDA against CPU: error relative to the CPU's
/// value (or to `floor`, for values that hover near 0 such as GRPO's loss) <= `tol[0]` at step
/// 1 and <= `tol[1]` after it (what the first steps' rounding differences become after a few
/// Adam updates). Exact keys (rewards of identical completions, their lengths) must be equal.
fn compare(
    what: &str,
    cpu: &[Value],
    gpu: &[Value],
    keys: &[&str],
    exact: &[&str],
    tol: [f64; 2],
    floor: f64,
) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: metrics lines");
    for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        for key in keys {
            let (x, y) = (c[key].as_f64(), g[key].as_f64());
            let (x, y) = (
                x.unwrap_or_else(|| panic!("{what} step {}: no {key} on the cpu: {c}", i + 1)),
                y.unwrap_or_else(|| panic!("{what} step {}: no {key} on cuda: {g}", i + 1)),
            );
            let err = (x - y).abs() / x.abs().max(floor);
            let limit = if i == 0 { tol[0] } else { tol[1] };
            eprintln!(
                "{what} step {} {key}: cpu {x:.7} cuda {y:.7} (rel {err:.1e})",
                i + 1
            );
            assert!(
                err <= limit,
                "{what} step {} {key}: cpu {x} cuda {y}: relative error {err:.2e} > {limit:.0e}",
                i + 1
            );
        }
        for key in exact {
            assert_eq!(
                c[key],
                g[key],
                "{what} step {} {key}: cpu against cuda",
                i + 1
            );
        }
    }
}

#[test]
fn sft_on_cuda_follows_the_cpu() {
    if cuda::device_or_skip("cuda_train sft").is_none() {
        return;
    }
    let evals = ["suite:colour"];
    let mut runs = Vec::new();
    for device in ["cpu", "cuda"] {
        let run = tmp(&format!("sft-{device}"));
        train(
            Kind::Sft,
            &config(&run, device, "mix:colour,facts", 4),
            &evals,
            false,
        );
        runs.push(metrics(&run));
    }
    compare(
        "sft",
        &runs[0],
        &runs[1],
        &["loss", "grad_norm"],
        &[],
        [1e-5, 2e-3],
        1e-6,
    );
    // The final evaluation ran on the device (greedy generation; `generation_on_cuda_...`
    // compares the tokens themselves) and scored the same.
    let last = |m: &[Value]| m.last().unwrap()["eval/colour/reward"].clone();
    assert!(
        last(&runs[0]).is_number(),
        "no evaluation: {:?}",
        runs[0].last()
    );
    assert_eq!(
        last(&runs[0]),
        last(&runs[1]),
        "eval/colour/reward: cpu against cuda"
    );
}

#[test]
fn grpo_on_cuda_follows_the_cpu() {
    if cuda::device_or_skip("cuda_train grpo").is_none() {
        return;
    }
    let mut runs = Vec::new();
    for device in ["cpu", "cuda"] {
        let run = tmp(&format!("grpo-{device}"));
        let mut cfg = config(&run, device, "mix:count,facts", 3);
        cfg.grpo.mu = 2;
        cfg.grpo.beta = 0.04;
        train(Kind::Grpo, &cfg, &[], false);
        runs.push(metrics(&run));
    }
    // The same seed draws the same completions from probabilities equal to f32 rounding (a
    // draw would change only if it fell within that rounding of a boundary between two
    // tokens), so their rewards and lengths are the CPU's, and the updates they drive too.
    compare(
        "grpo",
        &runs[0],
        &runs[1],
        &["loss", "grad_norm", "entropy"],
        &["reward_mean", "reward_std", "completion_len"],
        [1e-4, 5e-3],
        1e-2,
    );
    let grad = runs[1].iter().map(|m| m["grad_norm"].as_f64().unwrap());
    assert!(
        grad.clone().all(|g| g > 0.0),
        "no GRPO signal: {:?}",
        runs[1]
    );
}

#[test]
fn a_checkpoint_saved_on_cuda_resumes_on_cuda() {
    if cuda::device_or_skip("cuda_train resume").is_none() {
        return;
    }
    let whole = tmp("resume-whole");
    train(
        Kind::Sft,
        &config(&whole, "cuda", "mix:colour,facts", 4),
        &[],
        false,
    );
    let split = tmp("resume-split");
    let mut first = config(&split, "cuda", "mix:colour,facts", 2);
    first.train.save_every = 2;
    train(Kind::Sft, &first, &[], false);
    train(
        Kind::Sft,
        &config(&split, "cuda", "mix:colour,facts", 4),
        &[],
        true,
    );
    // The parameters and AdamW's moments went through the host and back: the steps after
    // the split are those of the uninterrupted run (to the device's summation order, where
    // a kernel adds with atomics).
    compare(
        "resume",
        &metrics(&whole),
        &metrics(&split),
        &["loss", "grad_norm"],
        &[],
        [1e-5, 1e-4],
        1e-6,
    );
}

#[test]
fn generation_on_cuda_follows_transformers_and_the_cpu() {
    if cuda::device_or_skip("cuda_train generation").is_none() {
        return;
    }
    let cpu = model();
    let gpu = cpu.to_device(Device::Cuda).unwrap();
    let sampling = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        stop_ids: Vec::new(),
    };
    for name in ["image", "text"] {
        // The prompts' pixels stay on the host, as a caller gives them.
        let (prompts, expected) = case(name, &cpu);
        let greedy = SamplingConfig::greedy(expected[0].len());
        let out = generate(&gpu, &prompts, &greedy, &mut Rng::new(0)).unwrap();
        for (r, (g, e)) in out.iter().zip(&expected).enumerate() {
            assert_eq!(
                &g.tokens, e,
                "{name}: row {r}, greedy on cuda against transformers"
            );
        }
        let want = generate(&cpu, &prompts, &sampling, &mut Rng::new(1)).unwrap();
        let got = generate(&gpu, &prompts, &sampling, &mut Rng::new(1)).unwrap();
        assert_eq!(got, want, "{name}: sampled on cuda against the cpu, seed 1");
        // bf16 weights (`generate --dtype bf16`): the prefill's logits and those of three
        // decode steps through the bf16 KV cache (fed transformers' tokens) within bf16's
        // rounding of the f32 ones (the largest difference against the largest logit).
        let bf16 = tessera::no_grad(|| gpu.cast(DType::BF16)).unwrap();
        let (mut want, mut f32_cache) = prefill(&gpu, &prompts).unwrap();
        let (mut got, mut bf16_cache) = prefill(&bf16, &prompts).unwrap();
        for step in 0..4 {
            let err = tessera::testing::cuda::rel_error(&got, &want).unwrap();
            assert!(
                err <= 3e-2,
                "{name}: bf16 logits at step {step}: relative error {err:.2e}"
            );
            if step == 3 {
                break;
            }
            let tokens: Vec<u32> = expected.iter().map(|e| e[step]).collect();
            want = decode_step(&gpu, &mut f32_cache, &tokens).unwrap();
            got = decode_step(&bf16, &mut bf16_cache, &tokens).unwrap();
        }
    }
}

#[test]
fn the_smoke_study_runs_on_cuda_as_on_the_cpu() {
    if cuda::device_or_skip("cuda_train study").is_none() {
        return;
    }
    use tessera::study::{Inputs, Preset, Study};
    let mut scores = Vec::new();
    for (device, dtype) in [
        (Device::Cpu, DType::F32),
        (Device::Cuda, DType::F32),
        (Device::Cuda, DType::BF16),
    ] {
        let dir = tmp(&format!("study-{device}-{dtype}"));
        let inputs = Inputs {
            tiny_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny"),
            device,
            dtype,
            ..Inputs::default()
        };
        let arms = Study::new(Preset::smoke(), inputs, dir.clone())
            .unwrap()
            .run()
            .unwrap_or_else(|e| panic!("the smoke study on {device} in {dtype}: {e}"));
        let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(
            dtype == DType::F32 || report.contains("--device cuda --dtype bf16"),
            "the rerun line names the device and dtype:\n{report}"
        );
        if dtype != DType::F32 {
            // bf16 (rounded differently from the CPU's f32): it runs to its report.
            continue;
        }
        scores.push(
            arms.iter()
                .map(|a| (a.name.clone(), a.scores.clone()))
                .collect::<Vec<_>>(),
        );
    }
    // Every arm's final greedy evaluation on every suite: the same arms and metrics, and
    // accuracies within one answer of the smoke preset's three a suite (an answer flips only
    // where two logits tie to within the devices' rounding differences, which a few training
    // steps can leave in a greedy path).
    assert_eq!(scores[0].len(), scores[1].len());
    for ((arm, cpu), (_, gpu)) in scores[0].iter().zip(&scores[1]) {
        assert_eq!(
            cpu.keys().collect::<Vec<_>>(),
            gpu.keys().collect::<Vec<_>>(),
            "{arm}"
        );
        for (k, v) in cpu {
            let (x, y) = (v.as_f64().unwrap(), gpu[k].as_f64().unwrap());
            assert!((x - y).abs() <= 0.34, "{arm} {k}: cpu {x} cuda {y}");
        }
    }
}

#[test]
fn bf16_training_on_cuda_follows_the_cpu_in_f32() {
    if cuda::device_or_skip("cuda_train bf16").is_none() {
        return;
    }
    let mut runs = Vec::new();
    for (device, dtype) in [("cpu", "f32"), ("cuda", "bf16")] {
        let run = tmp(&format!("sft-{dtype}"));
        let mut cfg = config(&run, device, "mix:colour,facts", 4);
        cfg.model.dtype = dtype.into();
        // Two sub-batches a step: each backward through copies of its own.
        cfg.train.length_buckets = 2;
        cfg.train.grad_accum = 2;
        train(Kind::Sft, &cfg, &[], false);
        runs.push(metrics(&run));
    }
    compare(
        "sft bf16",
        &runs[0],
        &runs[1],
        &["loss", "grad_norm"],
        &[],
        [2e-2, 5e-2],
        1e-6,
    );
    // GRPO in bf16 (rollouts from bf16 probabilities: not the CPU's draws): finite, and the
    // f32 weights move. A checkpoint of the f32 weights resumes.
    let run = tmp("grpo-bf16");
    let mut cfg = config(&run, "cuda", "mix:count,facts", 3);
    cfg.model.dtype = "bf16".into();
    cfg.grpo.mu = 2;
    cfg.grpo.beta = 0.04;
    cfg.train.save_every = 2;
    train(Kind::Grpo, &cfg, &[], false);
    let m = metrics(&run);
    for key in ["loss", "grad_norm", "entropy", "kl"] {
        let v: Vec<f64> = m.iter().map(|x| x[key].as_f64().unwrap()).collect();
        assert!(v.iter().all(|x| x.is_finite()), "grpo bf16 {key}: {v:?}");
    }
    assert!(
        m.iter().all(|x| x["grad_norm"].as_f64().unwrap() > 0.0),
        "{m:?}"
    );
    let mut more = cfg.clone();
    more.train.steps = 4;
    train(Kind::Grpo, &more, &[], true);
    assert_eq!(metrics(&run).len(), 4);
}
