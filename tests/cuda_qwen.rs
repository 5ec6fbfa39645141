//! The whole tiny Qwen2.5-VL (parity fixtures) forward and backward on CUDA against the CPU
//! backend: f32 logits, loss and every parameter gradient <= 1e-4 (relative L2); bf16 logits
//! <= 2e-2. Skips without a GPU.

mod common;

use common::load_batch;
use std::path::Path;
use tessera::backend::cuda;
use tessera::qwen2_5_vl::{Batch, QwenVl};
use tessera::{nn::Params, Rng, Tensor};
use tessera::{DType, Device};

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += (x - y).powi(2);
        den += y.powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

fn case(name: &str) {
    if cuda::device_or_skip(&format!("cuda_qwen {name}")).is_none() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen_parity")
        .join(name);
    compare(
        name,
        QwenVl::load(&dir, DType::F32).unwrap(),
        &load_batch(&dir),
    );
}

/// `cpu`'s forward and backward on `batch`, on the CPU and on CUDA.
fn compare(name: &str, cpu: QwenVl, batch: &Batch) {
    let out = cpu.forward(batch).unwrap();
    let loss = out.loss.unwrap();
    loss.backward().unwrap();

    let gpu = cpu.to_device(Device::Cuda).unwrap();
    let t = std::time::Instant::now();
    let gout = gpu.forward(batch).unwrap();
    assert!(gout.logits.is_cuda());
    let gloss = gout.loss.unwrap();
    gloss.backward().unwrap();
    cuda::device().unwrap().synchronize().unwrap();
    println!("{name}: cuda f32 forward+backward {:.1?}", t.elapsed());

    let e = rel_l2(
        &gout.logits.to_f64s().unwrap(),
        &out.logits.to_f64s().unwrap(),
    );
    println!("{name}: f32 logits rel {e:.2e}");
    assert!(e <= 1e-4, "{name}: f32 logits rel error {e}");
    let (a, b) = (gloss.to_scalar().unwrap(), loss.to_scalar().unwrap());
    assert!(((a - b) / b).abs() <= 1e-4, "{name}: loss {a} vs {b}");
    let mut worst = (0.0f64, String::new());
    for ((pname, p), (_, gp)) in cpu.params.iter().zip(gpu.params.iter()) {
        match (p.grad(), gp.grad()) {
            (Some(g), Some(gg)) => {
                assert!(gg.is_cuda(), "{pname}: gradient not on cuda");
                let e = rel_l2(&gg.to_f64s().unwrap(), &g.to_f64s().unwrap());
                assert!(e <= 1e-4, "{name}: gradient of {pname}: rel error {e}");
                if e > worst.0 {
                    worst = (e, pname.to_string());
                }
            }
            (None, None) => {}
            (a, b) => panic!(
                "{name}: {pname}: gradient on cpu {} vs cuda {}",
                a.is_some(),
                b.is_some()
            ),
        }
    }
    println!(
        "{name}: worst f32 gradient rel {:.2e} ({})",
        worst.0, worst.1
    );

    let bf = gpu.to_device(Device::Cuda).unwrap();
    let bf = QwenVl {
        config: bf.config.clone(),
        params: bf.params.to_dtype(DType::BF16).unwrap(),
    };
    let bout = tessera::no_grad(|| bf.forward(batch)).unwrap();
    assert_eq!(bout.logits.dtype(), DType::BF16);
    let e = rel_l2(
        &bout.logits.to_f64s().unwrap(),
        &out.logits.to_f64s().unwrap(),
    );
    println!("{name}: bf16 logits rel {e:.2e}");
    assert!(e <= 2e-2, "{name}: bf16 logits rel error {e}");
}

#[test]
fn tied_gqa_on_cuda_matches_cpu() {
    case("tied_gqa");
}

#[test]
fn untied_mha_on_cuda_matches_cpu() {
    case("untied_mha_hf_names");
}

/// A vision MLP 44 wide, which CUDA pads to 48 (`vision::Mlp`) and the CPU does not: random
/// weights and biases over the tied_gqa fixture's inputs.
#[test]
fn padded_vision_mlp_on_cuda_matches_cpu() {
    if cuda::device_or_skip("cuda_qwen padded vision MLP").is_none() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen_parity/tied_gqa");
    let mut config = tessera::qwen2_5_vl::Config::from_file(dir.join("config.json")).unwrap();
    config.vision.intermediate_size = 44;
    let mut rng = Rng::new(5);
    let model = QwenVl::random(config, DType::F32, &mut rng).unwrap();
    let mut params = Params::default();
    for (n, t) in model.params.iter() {
        let r = Tensor::randn(t.shape(), 0.05, DType::F32, &mut rng).unwrap();
        params.push(n, &r.requires_grad_());
    }
    let model = QwenVl {
        config: model.config,
        params,
    };
    compare("padded vision MLP", model, &load_batch(&dir));
}

#[test]
fn text_only_on_cuda_matches_cpu() {
    case("text_only_gqa4");
}

/// The tiny model in bf16 over f32 masters, as `tessera bench step` trains it: AdamW's compute
/// copies as leaves (`compute_leaves`: the bf16 gradients stay on the copies, the fused update
/// reads them) against the copies as cast nodes (`compute_params`: the backward casts each
/// gradient to its master). Tied embeddings make one copy serve two uses. Every gradient, and
/// the masters after two steps, bit for bit.
#[test]
fn bf16_gradients_on_the_compute_copies_are_exact() {
    use tessera::optim::{AdamW, AdamWConfig};
    if cuda::device_or_skip("cuda_qwen bf16 compute leaves").is_none() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen_parity/tied_gqa");
    let batch = load_batch(&dir);
    let cpu = QwenVl::load(&dir, DType::F32).unwrap();
    let (a, b) = (
        cpu.to_device(Device::Cuda).unwrap(),
        cpu.to_device(Device::Cuda).unwrap(),
    );
    let mut oa = AdamW::new(a.params.tensors(), AdamWConfig::default()).unwrap();
    let mut ob = AdamW::new(b.params.tensors(), AdamWConfig::default()).unwrap();
    for step in 0..2 {
        let ma = QwenVl {
            config: a.config.clone(),
            params: a
                .params
                .with_tensors(oa.compute_params(DType::BF16).unwrap())
                .unwrap(),
        };
        let leaves = ob.compute_leaves(DType::BF16).unwrap();
        let mb = QwenVl {
            config: b.config.clone(),
            params: b.params.with_tensors(leaves.clone()).unwrap(),
        };
        let la = ma.forward(&batch).unwrap().loss.unwrap();
        let lb = mb.forward(&batch).unwrap().loss.unwrap();
        assert_eq!(
            la.to_scalar().unwrap(),
            lb.to_scalar().unwrap(),
            "step {step}: loss"
        );
        la.backward().unwrap();
        lb.backward().unwrap();
        let mut with_grad = 0;
        for ((name, pa), l) in a.params.iter().zip(&leaves) {
            match (pa.grad(), l.grad()) {
                (Some(ga), Some(gl)) => {
                    assert_eq!(gl.dtype(), DType::BF16, "{name}");
                    let gl = gl.to_dtype(DType::F32).unwrap().to_f64s().unwrap();
                    assert!(
                        gl == ga.to_f64s().unwrap(),
                        "step {step}: gradient of {name} differs"
                    );
                    with_grad += 1;
                }
                (None, None) => {}
                (x, y) => panic!(
                    "{name}: gradient on master {} vs copy {}",
                    x.is_some(),
                    y.is_some()
                ),
            }
        }
        assert!(with_grad > 10, "only {with_grad} parameters got gradients");
        oa.step(1e-3).unwrap();
        ob.step(1e-3).unwrap();
        oa.zero_grad();
        ob.zero_grad();
        for ((name, pa), (_, pb)) in a.params.iter().zip(b.params.iter()) {
            assert!(
                pa.to_f64s().unwrap() == pb.to_f64s().unwrap(),
                "step {step}: master {name} differs"
            );
        }
    }
}

/// Activation checkpointing on CUDA, in bf16 over AdamW's compute copies as leaves (as `bench
/// step --checkpoint` trains): the loss, and every gradient on the copies, within bf16
/// rounding of the plain model's (the checkpointed forward runs without a graph, which may
/// pick other kernels, and a weight's gradient contributions are summed in another order).
#[test]
fn checkpointed_layers_on_cuda_match_the_plain_model() {
    use tessera::optim::{AdamW, AdamWConfig};
    if cuda::device_or_skip("cuda_qwen checkpointing").is_none() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen_parity/tied_gqa");
    let batch = load_batch(&dir);
    let gpu = QwenVl::load(&dir, DType::F32)
        .unwrap()
        .to_device(Device::Cuda)
        .unwrap();
    let mut opt = AdamW::new(gpu.params.tensors(), AdamWConfig::default()).unwrap();
    let leaves = opt.compute_leaves(DType::BF16).unwrap();
    let run = |ckpt: bool| {
        for l in &leaves {
            l.zero_grad();
        }
        let mut config = gpu.config.clone();
        config.gradient_checkpointing = ckpt;
        let m = QwenVl {
            config,
            params: gpu.params.with_tensors(leaves.clone()).unwrap(),
        };
        let loss = m.forward(&batch).unwrap().loss.unwrap();
        loss.backward().unwrap();
        let grads: Vec<Option<Vec<f64>>> = leaves
            .iter()
            .map(|l| l.grad().map(|g| g.to_f64s().unwrap()))
            .collect();
        (loss.to_scalar().unwrap(), grads)
    };
    let (l0, g0) = run(false);
    let (l1, g1) = run(true);
    assert!(((l1 - l0) / l0).abs() <= 1e-3, "loss {l1} vs {l0}");
    for ((name, _), (a, b)) in gpu.params.iter().zip(g1.iter().zip(&g0)) {
        match (a, b) {
            (Some(a), Some(b)) => {
                let e = rel_l2(a, b);
                assert!(e <= 2e-2, "{name}: checkpointed gradient rel error {e}");
            }
            (None, None) => {}
            _ => panic!("{name}: a gradient with one and not the other"),
        }
    }
    drop(opt);
}
