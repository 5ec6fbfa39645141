//! `tessera forward --device cuda` (f32 and bf16) through the real binary: with a GPU it
//! matches the transformers fixture; without one it fails with a clear "no CUDA" message.
//! TESSERA_BIN overrides the binary (the GPU check runs prebuilt binaries elsewhere).

use std::path::Path;
use std::process::Command;
use tessera::io::TensorFile;

fn tessera() -> Command {
    Command::new(
        std::env::var("TESSERA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tessera").to_string()),
    )
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

fn run(dtype: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen_parity/untied_mha_hf_names");
    let out_path =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cuda_forward_{dtype}.safetensors"));
    let _ = std::fs::create_dir_all(out_path.parent().unwrap());
    let out = tessera()
        .arg("forward")
        .arg("--model")
        .arg(&dir)
        .arg("--inputs")
        .arg(dir.join("inputs.safetensors"))
        .arg("--out")
        .arg(&out_path)
        .args(["--grad", "--device", "cuda", "--dtype", dtype])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !tessera::backend::cuda::is_available() {
        assert!(!out.status.success());
        assert!(
            err.contains("no CUDA"),
            "unclear error without a GPU: {err}"
        );
        tessera::backend::cuda::skip_note(&format!(
            "skipped forward on cuda ({dtype}): no GPU; the error was clear: {}",
            err.trim()
        ));
        return;
    }
    assert!(out.status.success(), "{err}");
    let ours = TensorFile::open(&out_path).unwrap();
    let theirs = TensorFile::open(dir.join("expected.safetensors")).unwrap();
    let inputs = TensorFile::open(dir.join("inputs.safetensors")).unwrap();
    let tol = if dtype == "bf16" { 3e-2 } else { 1e-4 };
    // Logits at real tokens only (transformers' values at padding positions are not defined
    // the same way; the parity test masks them too).
    let mask = inputs.get("attention_mask").unwrap().to_f64s().unwrap();
    let (a, b) = (
        ours.get("logits").unwrap().to_f64s().unwrap(),
        theirs.get("logits").unwrap().to_f64s().unwrap(),
    );
    let v = a.len() / mask.len();
    let keep: Vec<usize> = (0..a.len()).filter(|&i| mask[i / v] != 0.0).collect();
    let e = rel(
        &keep.iter().map(|&i| a[i]).collect::<Vec<_>>(),
        &keep.iter().map(|&i| b[i]).collect::<Vec<_>>(),
    );
    println!("forward --device cuda --dtype {dtype}: logits rel {e:.2e}");
    assert!(e < tol, "logits rel error {e}");
    let (l, lt) = (
        ours.get("loss").unwrap().to_scalar().unwrap(),
        theirs.get("loss").unwrap().to_scalar().unwrap(),
    );
    assert!(((l - lt) / lt).abs() < tol, "loss {l} vs {lt}");
    // Gradients of the f32 master weights (bf16 compute gives them to ~1e-2).
    let gtol = if dtype == "bf16" { 1e-1 } else { 1e-3 };
    let mut worst = 0f64;
    for name in theirs
        .names()
        .into_iter()
        .filter(|n| n.starts_with("grad."))
    {
        let e = rel(
            &ours.get(name).unwrap().to_f64s().unwrap(),
            &theirs.get(name).unwrap().to_f64s().unwrap(),
        );
        assert!(e < gtol, "{name}: rel error {e}");
        worst = worst.max(e);
    }
    println!(
        "forward --device cuda --dtype {dtype}: worst gradient rel {worst:.2e}, loss {l} vs {lt}"
    );
}

#[test]
fn forward_on_cuda_f32() {
    run("f32");
}

#[test]
fn forward_on_cuda_bf16() {
    run("bf16");
}
