//! Checkpoint loading and its errors: sharded checkpoints, the 3B/7B presets, missing tensors,
//! wrong shapes and bad configs — each error names the file and the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tessera::io::{self, TensorFile};
use tessera::qwen2_5_vl::{Config, QwenVl};
use tessera::{no_grad, DType, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen_parity")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copies the fixture's config and lets `edit` rewrite its tensors into `dir`.
fn variant(src: &str, dst: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let dir = scratch(dst);
    std::fs::copy(fixture(src).join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = io::load(fixture(src).join("model.safetensors")).unwrap();
    edit(&mut tensors);
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    io::save(dir.join("model.safetensors"), &refs, None).unwrap();
    dir
}

mod common;

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let dir = scratch("sharded");
    std::fs::copy(
        fixture("tied_gqa").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let tensors = io::load(fixture("tied_gqa").join("model.safetensors")).unwrap();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = HashMap::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let refs: Vec<(&str, &Tensor)> = part.iter().map(|(n, t)| (n.as_str(), t)).collect();
        io::save(dir.join(file), &refs, None).unwrap();
        for (n, _) in part {
            weight_map.insert(n.clone(), file.to_string());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let batch = common::load_batch(&fixture("tied_gqa"));
    let sharded = QwenVl::load(&dir, DType::F32).unwrap();
    let single = QwenVl::load(&fixture("tied_gqa"), DType::F32).unwrap();
    let (x, y) = no_grad(|| {
        (
            sharded.forward(&batch).unwrap().logits,
            single.forward(&batch).unwrap().logits,
        )
    });
    assert_eq!(x.to_vec::<f32>().unwrap(), y.to_vec::<f32>().unwrap());
}

#[test]
fn bf16_checkpoints_load_as_f32() {
    let dir = variant("tied_gqa", "bf16", |ts| {
        for (_, t) in ts.iter_mut() {
            *t = t.to_dtype(DType::BF16).unwrap();
        }
    });
    let m = QwenVl::load(&dir, DType::F32).unwrap();
    assert_eq!(
        m.params.require("model.norm.weight").unwrap().dtype(),
        DType::F32
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = variant("tied_gqa", "missing", |ts| {
        ts.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
    });
    let e = QwenVl::load(&dir, DType::F32).err().unwrap().to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn a_wrong_shape_names_file_tensor_and_shapes() {
    let dir = variant("tied_gqa", "wrong_shape", |ts| {
        for (n, t) in ts.iter_mut() {
            if n == "model.norm.weight" {
                *t = Tensor::ones(&[7], DType::F32).unwrap();
            }
        }
    });
    let e = QwenVl::load(&dir, DType::F32).err().unwrap().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("model.norm.weight") && e.contains("[7]"),
        "{e}"
    );
}

#[test]
fn configs_parse_in_both_layouts_and_bad_ones_are_refused() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let c3 = Config::from_file(root.join("qwen2.5-vl-3b/config.json")).unwrap();
    assert_eq!(
        (
            c3.text.hidden_size,
            c3.text.num_key_value_heads,
            c3.text.mrope_section
        ),
        (2048, 2, [16, 24, 24])
    );
    assert_eq!(
        (
            c3.vision.in_channels,
            c3.vision.fullatt_block_indexes.clone()
        ),
        (3, vec![7, 15, 23, 31])
    );
    assert!(c3.tie_word_embeddings);
    let c7 = Config::from_file(root.join("qwen2.5-vl-7b/config.json")).unwrap();
    assert_eq!(
        (
            c7.text.vocab_size,
            c7.vision.out_hidden_size,
            c7.tie_word_embeddings
        ),
        (152064, 3584, false)
    );
    let tiny = Config::from_file(root.join("bench-tiny/config.json")).unwrap();
    assert_eq!(
        (
            tiny.text.vocab_size,
            tiny.image_token_id,
            tiny.text.rope_theta
        ),
        (2048, 2000, 1e6)
    );
    // The nested layout written by transformers 5 (fixtures) parses to the same kind of config.
    let f = Config::from_file(fixture("tied_gqa").join("config.json")).unwrap();
    assert_eq!(f.text.mrope_section, [2, 3, 3]);

    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("qwen2.5-vl-3b/config.json")).unwrap(),
    )
    .unwrap();
    v["rope_scaling"]["mrope_section"] = serde_json::json!([16, 24, 20]);
    let e = Config::from_json(&v).unwrap_err().to_string();
    assert!(e.contains("mrope_section"), "{e}");
    let e = Config::from_file("/nonexistent/config.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/config.json"), "{e}");
}

#[test]
fn an_init_directory_round_trips() {
    // tessera's own writer (official names) is read back identically.
    let src = QwenVl::load(&fixture("untied_mha_hf_names"), DType::F32).unwrap();
    let dir = scratch("roundtrip");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("untied_mha_hf_names").join("config.json")).unwrap(),
    )
    .unwrap();
    tessera::qwen2_5_vl::weights::save_model_dir(&dir, &cfg, &src.params, DType::F32).unwrap();
    let names = TensorFile::open(dir.join("model.safetensors")).unwrap();
    assert!(names.contains("visual.merger.mlp.0.weight") && names.contains("lm_head.weight"));
    let back = QwenVl::load(&dir, DType::F32).unwrap();
    for (n, t) in src.params.iter() {
        assert_eq!(
            t.to_vec::<f32>().unwrap(),
            back.params.require(n).unwrap().to_vec::<f32>().unwrap(),
            "{n}"
        );
    }
}
