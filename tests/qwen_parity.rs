//! Qwen2.5-VL against transformers: logits, loss and every parameter's gradient on tiny random
//! models (fixtures by tools/parity/make_model_fixtures.py), including both on-disk naming
//! variants, several images of different grids per batch, GQA ratios and left padding.

mod common;

use common::load_batch;
use std::path::{Path, PathBuf};
use tessera::io::TensorFile;
use tessera::qwen2_5_vl::QwenVl;
use tessera::{DType, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen_parity")
        .join(name)
}

/// ‖a − b‖ / ‖b‖ over the elements where `keep` is true.
fn rel_err(a: &[f64], b: &[f64], keep: impl Fn(usize) -> bool) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for i in (0..a.len()).filter(|&i| keep(i)) {
        num += (a[i] - b[i]).powi(2);
        den += b[i].powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

fn check_case(name: &str) {
    let dir = fixture(name);
    let model = QwenVl::load(&dir, DType::F32).unwrap();
    let batch = load_batch(&dir);
    let expected = TensorFile::open(dir.join("expected.safetensors")).unwrap();
    let out = model.forward(&batch).unwrap();

    let mask = batch
        .attention_mask
        .as_ref()
        .unwrap()
        .to_vec::<i64>()
        .unwrap();
    let v = out.logits.dim(2).unwrap();
    let ours = out.logits.to_f64s().unwrap();
    let theirs = expected.get("logits").unwrap().to_f64s().unwrap();
    assert_eq!(out.logits.shape(), expected.shape("logits").unwrap());
    let e = rel_err(&ours, &theirs, |i| mask[i / v] != 0);
    eprintln!("{name}: logits relative error {e:.2e}");
    assert!(e <= 1e-4, "{name}: logits relative error {e}");

    let loss = out.loss.unwrap();
    let (l, lt) = (
        loss.to_scalar().unwrap(),
        expected.get("loss").unwrap().to_scalar().unwrap(),
    );
    eprintln!("{name}: loss {l} vs {lt}");
    assert!(((l - lt) / lt).abs() <= 1e-5, "{name}: loss {l} vs {lt}");

    loss.backward().unwrap();
    let mut worst = (0.0f64, String::new());
    for (pname, p) in model.params.iter() {
        let key = format!("grad.{pname}");
        match (p.grad(), expected.contains(&key)) {
            (Some(g), true) => {
                let e = rel_err(
                    &g.to_f64s().unwrap(),
                    &expected.get(&key).unwrap().to_f64s().unwrap(),
                    |_| true,
                );
                assert!(e <= 1e-3, "{name}: gradient of {pname}: relative error {e}");
                if e > worst.0 {
                    worst = (e, pname.to_string());
                }
            }
            (None, true) => panic!("{name}: no gradient for {pname}"),
            (Some(g), false) => {
                let n: f64 = g.to_f64s().unwrap().iter().map(|x| x * x).sum();
                assert!(
                    n == 0.0,
                    "{name}: {pname} has a gradient but transformers gives none"
                );
            }
            (None, false) => {}
        }
    }
    eprintln!(
        "{name}: worst gradient relative error {:.2e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn tied_gqa_with_images() {
    check_case("tied_gqa");
}

#[test]
fn untied_mha_with_hf5_names() {
    check_case("untied_mha_hf_names");
}

#[test]
fn text_only_left_padded() {
    check_case("text_only_gqa4");
}

#[test]
fn mismatched_image_tokens_are_an_error() {
    let dir = fixture("tied_gqa");
    let model = QwenVl::load(&dir, DType::F32).unwrap();
    let mut batch = load_batch(&dir);
    batch.image_grid_thw.pop();
    let n: usize = batch
        .image_grid_thw
        .iter()
        .map(|g| g[0] * g[1] * g[2])
        .sum();
    batch.pixel_values = Some(batch.pixel_values.unwrap().narrow(0, 0, n).unwrap());
    let e = model.forward(&batch).err().unwrap().to_string();
    assert!(e.contains("image"), "{e}");
    // Image tokens without pixel_values.
    let mut batch = load_batch(&dir);
    batch.pixel_values = None;
    let e = model.forward(&batch).err().unwrap().to_string();
    assert!(e.contains("no pixel_values"), "{e}");
    let _ = Tensor::zeros(&[1], DType::F32);
}

/// Activation checkpointing (`Config::gradient_checkpointing`: every decoder layer and vision
/// block computed again in the backward) gives the plain model's loss bit for bit and every
/// gradient to rounding, on the fixture with images.
#[test]
fn checkpointed_layers_give_the_same_gradients() {
    let dir = fixture("tied_gqa");
    let batch = load_batch(&dir);
    let run = |ckpt: bool| {
        let mut model = QwenVl::load(&dir, DType::F32).unwrap();
        model.config.gradient_checkpointing = ckpt;
        let loss = model.forward(&batch).unwrap().loss.unwrap();
        loss.backward().unwrap();
        let grads: Vec<(String, Vec<f64>)> = model
            .params
            .iter()
            .map(|(n, p)| {
                let g = p.grad().unwrap_or_else(|| panic!("{n}: no gradient"));
                (n.to_string(), g.to_f64s().unwrap())
            })
            .collect();
        (loss.to_scalar().unwrap(), grads)
    };
    let (l0, g0) = run(false);
    let (l1, g1) = run(true);
    assert_eq!(l0, l1);
    for ((name, a), (_, b)) in g1.iter().zip(&g0) {
        let e = rel_err(a, b, |_| true);
        assert!(e <= 1e-6, "{name}: checkpointed gradient rel error {e}");
    }
}
