//! Learning-dynamics probes on tiny random Qwen2.5-VL models in f64: the first-order influence
//! prediction against real SGD steps, per-sample gradients against `backward()`, parameter
//! selection, exact weight restoration, and the `tessera dynamics` command.

use std::path::{Path, PathBuf};
use std::process::Command;
use tessera::dynamics::{
    influence, perplexity, sample_gradient, sample_stats, with_step, InfluenceOptions, Objective,
    ParamSelector,
};
use tessera::qwen2_5_vl::{Config, QwenVl};
use tessera::rl::data::{collate, Encoded};
use tessera::{DType, Rng, Tensor};

fn fixture_config_json(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen_parity")
        .join(name)
        .join("config.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tiny_model(name: &str, dtype: DType, seed: u64) -> QwenVl {
    let config = Config::from_json(&fixture_config_json(name)).unwrap();
    QwenVl::random(config, dtype, &mut Rng::new(seed)).unwrap()
}

/// A sample from token ids: a few prompt tokens (with a 4-token image after a vision-start
/// token when `image`), then `completion` random tokens. Ids stay below the special ids.
fn sample(c: &Config, rng: &mut Rng, image: bool, prompt: usize, completion: usize) -> Encoded {
    let token = |rng: &mut Rng| (rng.next_u64() % 290) as u32;
    let mut ids: Vec<u32> = (0..prompt).map(|_| token(rng)).collect();
    let (pixel_values, grids) = if image {
        ids.insert(1, c.vision_start_token_id as u32);
        for k in 0..4 {
            ids.insert(2 + k, c.image_token_id as u32);
        }
        ids.insert(6, c.vision_end_token_id as u32);
        let px = Tensor::randn(&[16, 1176], 1.0, DType::F32, rng).unwrap();
        (Some(px), vec![[1, 4, 4]])
    } else {
        (None, vec![])
    };
    let prompt_len = ids.len();
    ids.extend((0..completion).map(|_| token(rng)));
    Encoded {
        input_ids: ids,
        prompt_len,
        pixel_values,
        image_grid_thw: grids,
    }
}

/// `n` samples, every other one with an image, prompt and completion lengths varying.
fn samples(c: &Config, seed: u64, n: usize) -> Vec<Encoded> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| sample(c, &mut rng, i % 2 == 0, 3 + i % 3, 2 + i % 4))
        .collect()
}

fn flat_f64(model: &QwenVl) -> Vec<u64> {
    model
        .params
        .iter()
        .flat_map(|(_, t)| t.to_f64s().unwrap())
        .map(f64::to_bits)
        .collect()
}

#[test]
fn predicted_change_matches_real_steps_to_first_order() {
    let model = tiny_model("tied_gqa", DType::F64, 1);
    let train = samples(&model.config, 10, 6);
    let probes = samples(&model.config, 20, 8);
    let lr = 0.002;
    let run = |lr: f64| {
        let opts = InfluenceOptions {
            actual: true,
            ..InfluenceOptions::new(lr)
        };
        influence(&model, &train[..], &probes[..], &opts).unwrap()
    };
    let reports: Vec<_> = [lr, lr / 2.0, lr / 4.0].into_iter().map(run).collect();
    let first = &reports[0];
    assert_eq!(first.pairs(), 48);
    let corr = first.correlation().unwrap();
    let p = first.predicted_stats();
    eprintln!(
        "lr {lr}: Pearson r {corr:.6} over {} pairs; predicted mean {:.3e} mean|.| {:.3e}; \
         cosine mean {:.3}; LBK mean {:.3e}; train ppl {:.2}, probe ppl {:.2}",
        first.pairs(),
        p.mean,
        p.mean_abs,
        first.cosine_stats().mean,
        first.lbk_stats().mean,
        first.train_perplexity(),
        first.probe_perplexity()
    );
    eprintln!(
        "time per pair: predicted {:.3e} s, actual {:.3e} s",
        first.predicted_s_per_pair(),
        first.actual_s_per_pair()
    );
    assert!(corr >= 0.95, "Pearson r {corr} < 0.95");
    // The prediction changes linearly with η; the predicted part is not trivially zero.
    assert!(p.mean_abs > 1e-4, "predicted changes too small: {p:?}");

    let err: Vec<f64> = reports
        .iter()
        .map(|r| {
            let a = r.actual.as_ref().unwrap();
            let (p, a): (Vec<f64>, Vec<f64>) = (
                r.predicted.iter().flatten().copied().collect(),
                a.iter().flatten().copied().collect(),
            );
            p.iter().zip(&a).map(|(p, a)| (a - p).abs()).sum::<f64>() / p.len() as f64
        })
        .collect();
    let ratios = [err[0] / err[1], err[1] / err[2]];
    eprintln!("mean |actual - predicted| at lr, lr/2, lr/4: {err:?}; ratios {ratios:?}");
    for r in ratios {
        assert!((3.0..=5.0).contains(&r), "error ratio {r} not near 4 (η²)");
    }

    // The SFT step (descent on the mean token NLL) moves θ by η/C_u · ∇ log π(x_u).
    let opts = InfluenceOptions {
        actual: true,
        step: Objective::SftLoss,
        ..InfluenceOptions::new(4.0 * lr)
    };
    let sft = influence(&model, &train[..], &probes[..], &opts).unwrap();
    for v in 0..probes.len() {
        for (u, e) in train.iter().enumerate() {
            let c = e.completion().len() as f64;
            let want = 4.0 * lr / c * first.inner[v][u];
            assert!((sft.predicted[v][u] - want).abs() <= 1e-12 * want.abs());
        }
    }
    let corr = sft.correlation().unwrap();
    eprintln!("sft step, lr {}: Pearson r {corr:.6}", 4.0 * lr);
    assert!(corr >= 0.95, "sft step: Pearson r {corr}");
}

#[test]
fn per_sample_gradient_equals_backward_on_the_same_sample() {
    let model = tiny_model("untied_mha_hf_names", DType::F64, 2);
    let e = sample(&model.config, &mut Rng::new(30), true, 4, 5);
    let selected = ParamSelector::all().resolve(&model.params).unwrap();
    let sft = sample_gradient(&model, &e, &selected, Objective::SftLoss).unwrap();
    let logprob = sample_gradient(&model, &e, &selected, Objective::LogProb).unwrap();

    // Reference: the mean cross-entropy of the collated batch's shifted labels over the full
    // f64 logits (the model's own `loss` is computed in f32, as transformers does), and
    // backward().
    let c = collate(&[&e], 0).unwrap();
    let logits = model.forward(&c.batch).unwrap().logits;
    let t = logits.dim(1).unwrap();
    let labels = c
        .batch
        .labels
        .as_ref()
        .unwrap()
        .narrow(1, 1, t - 1)
        .unwrap();
    let loss = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .cross_entropy(&labels, -100)
        .unwrap();
    let nll = loss.to_scalar().unwrap();
    loss.backward().unwrap();
    let reference: Vec<f64> = model
        .params
        .iter()
        .flat_map(|(_, t)| match t.grad() {
            Some(g) => g.to_f64s().unwrap(),
            None => vec![0.0; t.numel()],
        })
        .collect();
    let tokens = e.completion().len() as f64;
    let (mut num, mut den, mut num_lp) = (0.0, 0.0, 0.0);
    for ((r, s), l) in reference.iter().zip(&sft.grad).zip(&logprob.grad) {
        num += (r - s).powi(2);
        den += r * r;
        num_lp += (-tokens * r - l).powi(2);
    }
    let (rel, rel_lp) = (
        (num / den).sqrt(),
        (num_lp / (den * tokens * tokens)).sqrt(),
    );
    eprintln!(
        "per-sample gradient vs backward(): relative error {rel:.2e} (sft), {rel_lp:.2e} (log π)"
    );
    assert!(
        den > 0.0 && rel < 1e-10,
        "sft gradient relative error {rel}"
    );
    assert!(rel_lp < 1e-10, "log π gradient relative error {rel_lp}");
    // The vision tower is reached through the image.
    let vision_norm: f64 = model
        .params
        .iter()
        .filter(|(n, _)| n.starts_with("visual."))
        .map(|(_, t)| {
            t.grad()
                .map_or(0.0, |g| g.to_f64s().unwrap().iter().map(|x| x * x).sum())
        })
        .sum();
    assert!(vision_norm > 0.0);

    // log π and perplexity agree with the model's loss: exp(mean NLL).
    assert!((sft.stats.logprob + tokens * nll).abs() < 1e-10 * nll.abs().max(1.0));
    let ppl = perplexity(&model, &[e.clone()][..]).unwrap();
    assert!(
        (ppl - nll.exp()).abs() < 1e-10 * ppl,
        "{ppl} vs {}",
        nll.exp()
    );

    // ‖A‖² = Σ_t ‖onehot(y_t) − softmax(z_t)‖², from the full logits.
    let out = model.forward(&c.batch).unwrap();
    let v = out.logits.dim(2).unwrap();
    let z = out.logits.to_f64s().unwrap();
    let mut a_sq = 0.0;
    for (j, &y) in e.completion().iter().enumerate() {
        let row = &z[(e.prompt_len - 1 + j) * v..(e.prompt_len + j) * v];
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        for (k, x) in row.iter().enumerate() {
            let p = (x - lse).exp();
            let d = if k == y as usize { 1.0 - p } else { -p };
            a_sq += d * d;
        }
    }
    let got = sample_stats(&model, &e).unwrap().logit_grad_norm_sq;
    assert!((got - a_sq).abs() < 1e-10 * a_sq, "‖A‖² {got} vs {a_sq}");
}

#[test]
fn selector_globs_pick_the_named_parameters() {
    let model = tiny_model("untied_mha_hf_names", DType::F64, 3);
    let layers = model.config.text.num_hidden_layers;
    let sel = ParamSelector::parse("model.layers.*.mlp.*, lm_head.weight").unwrap();
    let chosen = sel.resolve(&model.params).unwrap();
    let mut expected = vec![];
    for l in 0..layers {
        for p in ["gate_proj", "up_proj", "down_proj"] {
            expected.push(format!("model.layers.{l}.mlp.{p}.weight"));
        }
    }
    expected.push("lm_head.weight".to_string());
    let mut names = chosen.names.clone();
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
    let numel: usize = expected
        .iter()
        .map(|n| model.params.require(n).unwrap().numel())
        .sum();
    assert_eq!(chosen.numel, numel);
    assert_eq!(
        ParamSelector::all().resolve(&model.params).unwrap().numel,
        model.params.numel()
    );
    assert!(!sel.matches("model.layers.0.self_attn.q_proj.weight"));

    // A pattern that matches nothing is an error naming it.
    let e = ParamSelector::parse("model.layers.*.mlp.*,lm_head.wieght")
        .unwrap()
        .resolve(&model.params)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lm_head.wieght"), "{e}");
    assert!(ParamSelector::parse(" , ").is_err());

    // The selected gradient is the matching slice of the full one.
    let e = samples(&model.config, 40, 1).remove(0);
    let full = sample_gradient(
        &model,
        &e,
        &ParamSelector::all().resolve(&model.params).unwrap(),
        Objective::LogProb,
    )
    .unwrap();
    let part = sample_gradient(&model, &e, &chosen, Objective::LogProb).unwrap();
    let mut expected_part = vec![];
    let mut offset = 0;
    for (n, t) in model.params.iter() {
        if sel.matches(n) {
            expected_part.extend_from_slice(&full.grad[offset..offset + t.numel()]);
        }
        offset += t.numel();
    }
    assert_eq!(part.grad.len(), chosen.numel);
    let worst = part
        .grad
        .iter()
        .zip(&expected_part)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-12, "selected gradient differs by {worst}");
}

#[test]
fn weights_are_restored_bit_exactly_after_measured_steps() {
    for dtype in [DType::F64, DType::F32] {
        let model = tiny_model("tied_gqa", dtype, 4);
        let data = samples(&model.config, 50, 3);
        let before = flat_f64(&model);
        let opts = InfluenceOptions {
            actual: true,
            selector: ParamSelector::parse("model.layers.*,visual.merger.*").unwrap(),
            ..InfluenceOptions::new(0.3)
        };
        let r = influence(&model, &data[..2], &data[1..], &opts).unwrap();
        assert!(r.actual.unwrap().iter().flatten().any(|&d| d != 0.0));
        assert!(flat_f64(&model) == before, "{dtype}: weights changed");

        // Inside the step the weights do differ; an error inside still restores them.
        let selected = opts.selector.resolve(&model.params).unwrap();
        let g = sample_gradient(&model, &data[0], &selected, Objective::LogProb).unwrap();
        let err = with_step(&selected, &g.grad, 0.3, || {
            assert!(
                flat_f64(&model) != before,
                "{dtype}: the step changed nothing"
            );
            Err::<(), _>(tessera::Error::msg("fails inside"))
        });
        assert!(err.is_err());
        assert!(
            flat_f64(&model) == before,
            "{dtype}: weights changed after an error"
        );
    }
}

// ------------------------------------------------------------------- the command line

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny model directory whose vocabulary is the embedded tiny tokenizer's.
fn tiny_model_dir(dir: &Path) {
    let tok = tessera::qwen2_5_vl::tokenizer::QwenTokenizer::from_bytes(
        tessera::tasks::vocab::TINY_TOKENIZER_JSON.as_bytes(),
    )
    .unwrap();
    let s = *tok.special();
    let mut json = fixture_config_json("tied_gqa");
    json["text_config"]["vocab_size"] =
        serde_json::json!(tessera::tasks::vocab::padded_vocab_size(tok.vocab_size()));
    json["image_token_id"] = serde_json::json!(s.image_pad);
    json["video_token_id"] = serde_json::json!(s.video_pad);
    json["vision_start_token_id"] = serde_json::json!(s.vision_start);
    json["vision_end_token_id"] = serde_json::json!(s.vision_end);
    let config = Config::from_json(&json).unwrap();
    let model = QwenVl::random(config, DType::F32, &mut Rng::new(5)).unwrap();
    tessera::qwen2_5_vl::weights::save_model_dir(dir, &json, &model.params, DType::F32).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        tessera::tasks::vocab::TINY_TOKENIZER_JSON,
    )
    .unwrap();
}

#[test]
fn cli_writes_the_csv_summary_and_heatmap() {
    let dir = scratch("dynamics_cli");
    let model_dir = dir.join("model");
    tiny_model_dir(&model_dir);
    let img = image::RgbImage::from_fn(56, 56, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 90])
    });
    img.save(dir.join("square.png")).unwrap();
    std::fs::write(
        dir.join("train.jsonl"),
        "{\"image\": \"square.png\", \"question\": \"what colour is the shape?\", \"answer\": \"red\"}\n\
         {\"image\": null, \"question\": \"what is 2 plus 3?\", \"answer\": \"5\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("probe.jsonl"),
        "{\"image\": \"square.png\", \"question\": \"how many shapes are there?\", \"answer\": \"1\"}\n\
         {\"image\": null, \"question\": \"what is 4 plus 1?\", \"answer\": \"5\"}\n\n\
         {\"image\": \"square.png\", \"question\": \"what colour is the shape?\", \"answer\": \"blue\", \"scorer\": \"exact\"}\n",
    )
    .unwrap();
    let out_dir = dir.join("out");
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["--threads", "2", "dynamics", "--model"])
        .arg(&model_dir)
        .arg("--train")
        .arg(dir.join("train.jsonl"))
        .arg("--probe")
        .arg(dir.join("probe.jsonl"))
        .args(["--lr", "1e-4", "--actual", "--dtype", "f64", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    eprintln!("{stderr}");

    let csv = std::fs::read_to_string(out_dir.join("influence.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "probe,logprob,tokens,predicted_u0,predicted_u1,actual_u0,actual_u1,\
         cosine_u0,cosine_u1,lbk_u0,lbk_u1"
    );
    assert_eq!(lines.len(), 4, "{csv}");
    let (mut predicted, mut actual) = (vec![], vec![]);
    for l in &lines[1..] {
        let cells: Vec<f64> = l.split(',').map(|c| c.parse().unwrap()).collect();
        assert_eq!(cells.len(), 11);
        assert!(cells.iter().all(|c| c.is_finite()), "{l}");
        predicted.extend_from_slice(&cells[3..5]);
        actual.extend_from_slice(&cells[5..7]);
    }
    let r = tessera::dynamics::pearson(&predicted, &actual);
    assert!(r > 0.9, "CLI: predicted vs actual Pearson r {r}\n{csv}");
    let summary = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    for needle in [
        "Pearson r",
        "perplexity",
        "LBK",
        "per (u, v) pair",
        "cosine",
    ] {
        assert!(
            summary.contains(needle),
            "summary.md lacks {needle:?}:\n{summary}"
        );
    }
    let png = image::open(out_dir.join("influence.png"))
        .unwrap()
        .to_rgb8();
    // 2 columns × 24 px per panel, two panels and a 4 px bar; 3 rows × 24 px.
    assert_eq!((png.width(), png.height()), (2 * 24 * 2 + 4, 3 * 24));

    // Errors name the input.
    let bad = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["dynamics", "--model"])
        .arg(&model_dir)
        .arg("--train")
        .arg(dir.join("missing.jsonl"))
        .arg("--probe")
        .arg(dir.join("probe.jsonl"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("missing.jsonl"));
}
