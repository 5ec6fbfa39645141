//! The trainers: exact resume, checkpoints that survive SIGKILL, NaN stop, rollout export.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tessera::qwen2_5_vl::model::QwenVl;
use tessera::rl::checkpoint;
use tessera::rl::config::TrainConfig;
use tessera::rl::sources;
use tessera::rl::task::Task;
use tessera::rl::trainer::{Kind, Trainer};
use tessera::DType;

#[path = "common/runs.rs"]
mod runs;
use runs::{by_length, config, metrics};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    runs::tmp(&format!("train-{name}"))
}

fn field(m: &[Value], key: &str) -> Vec<f64> {
    m.iter().map(|v| v[key].as_f64().unwrap()).collect()
}

fn open(cfg: &TrainConfig) -> Box<dyn Task> {
    sources::open(&cfg.data.train, cfg).unwrap()
}

/// Runs `steps` in one go, and `split` steps then a resumed run to `steps`; the metrics of the
/// steps after the split must be identical.
fn check_resume(kind: Kind, train: &str, steps: u64, split: u64, keys: &[&str]) {
    let open = |cfg: &TrainConfig| -> Box<dyn Task> { by_length(open(cfg), false) };
    let a = tmp(&format!("{}-a", kind.name()));
    let cfg = config(&a, train, steps);
    Trainer::new(kind, cfg.clone(), open(&cfg), vec![], false)
        .unwrap()
        .train()
        .unwrap();

    let b = tmp(&format!("{}-b", kind.name()));
    let mut first = config(&b, train, split);
    first.train.steps = split;
    Trainer::new(kind, first.clone(), open(&first), vec![], false)
        .unwrap()
        .train()
        .unwrap();
    let cfg_b = config(&b, train, steps);
    let mut resumed = Trainer::new(kind, cfg_b.clone(), open(&cfg_b), vec![], true).unwrap();
    assert_eq!(resumed.state.step, split);
    resumed.train().unwrap();

    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), steps as usize);
    assert_eq!(
        mb.len(),
        steps as usize,
        "resumed metrics.jsonl has one line per step"
    );
    for key in keys {
        let (x, y) = (field(&ma, key), field(&mb, key));
        assert_eq!(
            x, y,
            "{key}: uninterrupted {x:?} vs stopped at {split} and resumed {y:?}"
        );
    }
    // The loss moved: the comparison is not between constants.
    let loss = field(&ma, "loss");
    assert!(loss.iter().any(|&l| l != loss[0]), "{loss:?}");
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn sft_resume_continues_exactly() {
    check_resume(Kind::Sft, "mix:colour,facts", 4, 2, &["loss", "grad_norm"]);
}

#[test]
fn sft_length_buckets_give_the_same_loss_and_gradient() {
    // rank (half of it worded like the jigsaw: long prompts) and facts (short, text only)
    // differ enough in length that a batch of 16 splits; the sum of the sub-batches' weighted
    // losses must be the one padded batch's token mean.
    let run = |buckets: usize| {
        let out = tmp(&format!("buckets-{buckets}"));
        let mut cfg = config(&out, "mix:rank,facts", 3);
        cfg.train.length_buckets = buckets;
        cfg.train.batch_size = 16;
        Trainer::new(Kind::Sft, cfg.clone(), open(&cfg), vec![], false)
            .unwrap()
            .train()
            .unwrap();
        let m = metrics(&out);
        (
            field(&m, "loss"),
            field(&m, "grad_norm"),
            field(&m, "sub_batches"),
        )
    };
    let (one, split) = (run(1), run(4));
    assert_eq!(one.0.len(), 3);
    assert!(one.2.iter().all(|&n| n == 1.0), "{:?}", one.2);
    assert!(split.2.iter().all(|&n| n > 1.0), "{:?}", split.2);
    for (a, b) in one
        .0
        .iter()
        .chain(&one.1)
        .zip(split.0.iter().chain(&split.1))
    {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "{one:?} vs {split:?}"
        );
    }
}

/// `model.gradient_checkpointing` trains the same model: the same losses and gradient norms
/// over three SFT steps with images (to rounding: a weight's gradient contributions are
/// summed in another order).
#[test]
fn sft_with_gradient_checkpointing_gives_the_same_steps() {
    let run = |ckpt: bool| {
        let out = tmp(&format!("ckpt-{ckpt}"));
        let mut cfg = config(&out, "mix:colour,facts", 3);
        cfg.model.gradient_checkpointing = ckpt;
        Trainer::new(Kind::Sft, cfg.clone(), open(&cfg), vec![], false)
            .unwrap()
            .train()
            .unwrap();
        let m = metrics(&out);
        (field(&m, "loss"), field(&m, "grad_norm"))
    };
    let (plain, ckpt) = (run(false), run(true));
    assert_eq!(plain.0.len(), 3);
    for (a, b) in plain
        .0
        .iter()
        .chain(&plain.1)
        .zip(ckpt.0.iter().chain(&ckpt.1))
    {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "{plain:?} vs {ckpt:?}"
        );
    }
}

#[test]
fn grpo_log_probabilities_are_those_of_the_tempered_sampler() {
    // TRL's GRPO divides the logits by the sampling temperature before the log-softmax; at
    // temperature 2 every completion token's log π must be log softmax(logits / 2)[token].
    use tessera::qwen2_5_vl::config::Config;
    use tessera::qwen2_5_vl::tokenizer::QwenTokenizer;
    use tessera::rl::data::{collate, completion_logits, policy_logprobs, Encoder, Example};
    let dir = root().join("models/tiny");
    let config = Config::from_file(dir.join("config.json")).unwrap();
    let model = QwenVl::random(config, DType::F32, &mut tessera::Rng::new(5)).unwrap();
    let tok = QwenTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let encoder = Encoder::new(tok, &model.config);
    let ex = |q: &str, a: &str| Example {
        image: None,
        question: q.into(),
        answer: a.into(),
    };
    let items = [
        encoder.example(&ex("what is 2 plus 3?", "5")).unwrap(),
        encoder
            .example(&ex("which animal rules vell?", "cat"))
            .unwrap(),
    ];
    let c = collate(&items.iter().collect::<Vec<_>>(), encoder.pad_id()).unwrap();
    let logits = completion_logits(&model, &c).unwrap();
    let (b, cols, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    let x = logits.to_f64s().unwrap();
    let ids = c.batch.input_ids.as_ref().unwrap().to_f64s().unwrap();
    let t = c.batch.input_ids.as_ref().unwrap().shape()[1];
    for (temp, div) in [(2.0, 2.0), (1.0, 1.0), (0.0, 1.0)] {
        let lp = policy_logprobs(&model, &c, temp)
            .unwrap()
            .to_f64s()
            .unwrap();
        for r in 0..b {
            for j in 0..cols {
                let row = &x[(r * cols + j) * v..(r * cols + j + 1) * v];
                let m = row.iter().fold(f64::MIN, |a, &y| a.max(y / div));
                let lse = m + row.iter().map(|&y| (y / div - m).exp()).sum::<f64>().ln();
                let id = ids[r * t + c.prompt_cols + j] as usize;
                let want = row[id] / div - lse;
                let got = lp[r * cols + j];
                assert!(
                    (got - want).abs() < 1e-4,
                    "T {temp} ({r}, {j}): {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn grpo_resume_continues_exactly() {
    check_resume(
        Kind::Grpo,
        "mix:count,facts",
        3,
        1,
        &[
            "loss",
            "reward_mean",
            "entropy",
            "completion_len",
            "grad_norm",
        ],
    );
}

fn assert_loadable(run: &Path) -> u64 {
    let dir = checkpoint::latest(run)
        .unwrap()
        .expect("a checkpoint must exist");
    let model = QwenVl::load(&dir, DType::F32).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let state = checkpoint::load_state(&dir).unwrap();
    let tensors = tessera::io::load(dir.join("optimizer.safetensors")).unwrap();
    assert!(!tensors.is_empty());
    assert!(model.params.len() > 10);
    state.step
}

#[test]
fn sigkill_at_any_moment_leaves_a_loadable_checkpoint() {
    let run = tmp("sigkill");
    let model = root().join("models/tiny");
    let mut last = 0;
    // Every step saves (model + optimiser, ~12 MB), so much of the time is spent saving;
    // kills land at different moments of the cycle.
    for (i, delay_ms) in [900u64, 1300, 1700, 2300, 2900].iter().enumerate() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args([
                "--threads",
                "1",
                "train",
                "sft",
                "--steps",
                "10000",
                "--out",
            ])
            .arg(&run)
            .args(["--set", &format!("model.dir=\"{}\"", model.display())])
            .args([
                "--set",
                "model.init_seed=1",
                "--set",
                "data.train=suite:colour",
                "--set",
                "train.batch_size=2",
                "--set",
                "train.save_every=1",
                "--set",
                "train.progress=false",
            ])
            .args(if i > 0 { vec!["--resume"] } else { vec![] })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if checkpoint::latest(&run).unwrap().is_some() {
            let step = assert_loadable(&run);
            assert!(step >= last, "checkpoint went back from {last} to {step}");
            last = step;
        }
    }
    assert!(last > 0, "no checkpoint was written in five runs");
    let _ = std::fs::remove_dir_all(&run);
}

#[test]
fn a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint() {
    let run = tmp("nan");
    let mut cfg = config(&run, "suite:colour", 30);
    cfg.optim.lr = 1e30;
    cfg.optim.max_grad_norm = 0.0;
    cfg.train.save_every = 1;
    cfg.train.keep_checkpoints = 0;
    let mut t = Trainer::new(Kind::Sft, cfg.clone(), open(&cfg), vec![], false).unwrap();
    let err = t.train().expect_err("lr 1e30 must blow up").to_string();
    assert!(
        err.contains("step ") && err.contains("training stopped") && err.contains("checkpoint"),
        "{err}"
    );
    let failed: u64 = err
        .split("step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no step number in: {err}"));
    let kept = assert_loadable(&run);
    assert_eq!(kept + 1, failed, "{err}");
    // The kept checkpoint's weights are finite.
    let dir = checkpoint::latest(&run).unwrap().unwrap();
    for (name, t) in QwenVl::load(&dir, DType::F32).unwrap().params.iter() {
        assert!(
            t.to_f64s().unwrap().iter().all(|v| v.is_finite()),
            "{name} is not finite in the kept checkpoint"
        );
    }
    let _ = std::fs::remove_dir_all(&run);
}

#[test]
fn correct_rollouts_export_as_an_sft_dataset() {
    let run = tmp("export");
    let mut cfg = config(&run, "suite:colour", 1);
    let jsonl = run.join("rollouts.jsonl");
    cfg.grpo.export_correct = Some(jsonl.display().to_string());
    std::fs::create_dir_all(&run).unwrap();
    let task = by_length(open(&cfg), true);
    Trainer::new(Kind::Grpo, cfg.clone(), task, vec![], false)
        .unwrap()
        .train()
        .unwrap();
    let records = tessera::tasks::dataset::load_jsonl(&jsonl).unwrap();
    assert_eq!(records.len(), 6, "2 prompts x 3 completions");
    assert!(records[0].load_image().unwrap().is_some());
    // `train sft` reads it.
    let sft_run = run.join("sft");
    let mut sft = config(&sft_run, &jsonl.display().to_string(), 2);
    sft.data.train = jsonl.display().to_string();
    Trainer::new(Kind::Sft, sft.clone(), open(&sft), vec![], false)
        .unwrap()
        .train()
        .unwrap();
    assert_eq!(metrics(&sft_run).len(), 2);
    let _ = std::fs::remove_dir_all(&run);
}

#[test]
fn config_errors_name_the_key() {
    let err = TrainConfig::load(
        None,
        &["data.train=suite:colour".into(), "optim.lrr=1".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("lrr"), "{err}");
    let err = TrainConfig::load(None, &[]).unwrap_err().to_string();
    assert!(err.contains("data.train"), "{err}");
    let cfg = TrainConfig::load(None, &["data.train=suite:nope".into()]).unwrap();
    let err = sources::open(&cfg.data.train, &cfg)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope") && err.contains("colour"), "{err}");
    let cfg = TrainConfig::load(
        None,
        &["data.train=jigsaw:2x2".into(), "grpo.loss_type=ppo".into()],
    );
    assert!(cfg.unwrap_err().to_string().contains("ppo"));
    let err = TrainConfig::load(
        None,
        &["data.train=suite:colour".into(), "model.device=tpu".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("model.device") && err.contains("tpu"), "{err}");
    for (dtype, want) in [("bf16", "needs model.device"), ("fp8", "want f32 or bf16")] {
        let err = TrainConfig::load(
            None,
            &[
                "data.train=suite:colour".into(),
                format!("model.dtype=\"{dtype}\""),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("model.dtype") && err.contains(want), "{err}");
    }
}

#[test]
fn grpo_with_kl_several_passes_and_every_loss_type_runs() {
    for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"] {
        let run = tmp(&format!("kl-{loss_type}"));
        let mut cfg = config(&run, "mix:count,facts", 2);
        cfg.grpo.mu = 2;
        cfg.grpo.beta = 0.04;
        cfg.grpo.epsilon_high = Some(0.28);
        cfg.grpo.loss_type = loss_type.into();
        cfg.train.batch_size = 4; // 6 rollouts -> micro-batches of 4 and 2
        let task = by_length(open(&cfg), false);
        Trainer::new(Kind::Grpo, cfg, task, vec![], false)
            .unwrap()
            .train()
            .unwrap();
        let m = metrics(&run);
        // Metrics come from the last pass: by then the policy has left the reference.
        let kl = field(&m, "kl");
        assert!(
            kl.iter().all(|&k| k >= 0.0 && k.is_finite()),
            "{loss_type}: {kl:?}"
        );
        assert!(kl[1] > 0.0, "{loss_type}: {kl:?}");
        for key in ["loss", "clip_frac", "entropy", "grad_norm"] {
            assert!(
                field(&m, key).iter().all(|v| v.is_finite()),
                "{loss_type} {key}"
            );
        }
        let _ = std::fs::remove_dir_all(&run);
    }
}
