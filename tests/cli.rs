//! The command-line contracts of DESIGN.md, run through the real binary.

use std::path::Path;
use std::process::Command;
use tessera::io::TensorFile;

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// Runs `cmd` and returns its output, failing the test with its stderr if it did not succeed.
fn ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn tmp(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

#[test]
fn demo_trains_and_the_loss_falls() {
    let out = ok(tessera().args([
        "--threads",
        "2",
        "demo",
        "--steps",
        "60",
        "--batch",
        "32",
        "--log-every",
        "20",
        "--digits",
        "4",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let losses: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("train loss ").nth(1))
        .map(|r| r.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 3, "{text}");
    assert!(
        losses[2] < losses[0] * 0.8,
        "loss did not fall: {losses:?}\n{text}"
    );
}

#[test]
fn forward_with_grad_matches_the_transformers_fixture() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen_parity/untied_mha_hf_names");
    let out_path = tmp("cli_forward.safetensors");
    ok(tessera()
        .arg("forward")
        .arg("--model")
        .arg(&dir)
        .arg("--inputs")
        .arg(dir.join("inputs.safetensors"))
        .arg("--out")
        .arg(&out_path)
        .arg("--grad"));
    let ours = TensorFile::open(&out_path).unwrap();
    let theirs = TensorFile::open(dir.join("expected.safetensors")).unwrap();
    let loss = (
        ours.get("loss").unwrap().to_scalar().unwrap(),
        theirs.get("loss").unwrap().to_scalar().unwrap(),
    );
    assert!(((loss.0 - loss.1) / loss.1).abs() < 1e-5, "{loss:?}");
    assert_eq!(
        ours.shape("logits").unwrap(),
        theirs.shape("logits").unwrap()
    );
    for name in theirs
        .names()
        .into_iter()
        .filter(|n| n.starts_with("grad."))
    {
        let (a, b) = (
            ours.get(name).unwrap().to_f64s().unwrap(),
            theirs.get(name).unwrap().to_f64s().unwrap(),
        );
        let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        assert!((num / den).sqrt() < 1e-3, "{name}");
    }
}

#[test]
fn forward_errors_name_the_input() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen_parity/tied_gqa");
    let missing = tessera()
        .args(["forward", "--model"])
        .arg(&dir)
        .args(["--inputs", "/nonexistent/in.safetensors", "--out"])
        .arg(tmp("never.safetensors"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/in.safetensors"));
    let nomodel = tessera()
        .args(["forward", "--model", "/nonexistent/model", "--inputs"])
        .arg(dir.join("inputs.safetensors"))
        .arg("--out")
        .arg(tmp("never.safetensors"))
        .output()
        .unwrap();
    assert!(!nomodel.status.success());
    assert!(String::from_utf8_lossy(&nomodel.stderr).contains("/nonexistent/model"));
}

#[test]
fn tokenize_chat_expands_image_pads() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tokenizers/qwen/tokenizer.json");
    if !path.exists() {
        eprintln!("skipped: ../shared/tokenizers/qwen/tokenizer.json not found");
        return;
    }
    let out = ok(tessera()
        .args(["tokenize", "--tokenizer"])
        .arg(&path)
        .args([
            "--text",
            "Describe this.",
            "--chat",
            "--image-grid",
            "1,4,6",
        ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u64> = v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(ids.iter().filter(|&&i| i == 151655).count(), 6);
    assert_eq!(ids[0], 151644);
    assert_eq!(&ids[ids.len() - 3..], &[151644, 77091, 198]);
}

#[test]
fn preprocess_writes_the_contract_tensors() {
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess/rgb_70x98.png");
    let out_path = tmp("cli_preprocess.safetensors");
    ok(tessera()
        .arg("preprocess")
        .arg("--image")
        .arg(&img)
        .arg("--out")
        .arg(&out_path));
    let f = TensorFile::open(&out_path).unwrap();
    assert_eq!(
        f.get("image_grid_thw").unwrap().to_vec::<i64>().unwrap(),
        vec![1, 4, 8]
    );
    assert_eq!(f.shape("pixel_values").unwrap(), &[32, 1176]);
    let bad = tessera()
        .args(["preprocess", "--image", "/nonexistent.png", "--out"])
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent.png"));
}

/// `generate --bench` on the tiny preset, whose image/video/vision ids (3..6) lie among the
/// ids a random prompt draws: the prompts must avoid them (it used to fail with "video inputs
/// are not supported").
#[test]
fn generate_bench_runs_on_the_tiny_preset() {
    let dir = tmp("generate_bench_tiny");
    let _ = std::fs::remove_dir_all(&dir);
    ok(tessera()
        .args(["init", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny/config.json"))
        .arg("--out")
        .arg(&dir));
    let out = ok(tessera()
        .args(["--threads", "2", "generate", "--model"])
        .arg(&dir)
        .args([
            "--bench",
            "8",
            "--bench-prompt-len",
            "64",
            "--max-new-tokens",
            "4",
        ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let row: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(row["batch"], 8, "{text}");
    assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
