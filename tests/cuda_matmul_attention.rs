//! CUDA matmul / linear / attention against the CPU backend (outputs and every input
//! gradient), and the CUDA AdamW / SGD steps and clip_grad_norm against the CPU optimisers.
//! Every test prints a skip message and passes when there is no CUDA device.
//!
//! Tolerances: relative to the reference's max |value|, f32 1e-5 and bf16 1e-2
//! (`testing::cuda::tol`); the optimiser steps use the same f32 arithmetic as the CPU path, so
//! they are held to 1e-6.

use tessera::backend::cuda;
use tessera::ops::attention::AttentionOptions;
use tessera::optim::{clip_grad_norm, AdamW, AdamWConfig, ParamGroup, Sgd, SgdConfig};
use tessera::testing::cuda::{assert_close_to_cpu, randn, rel_error, tol};
use tessera::{DType, Device, Result, Tensor};

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

fn check(name: &str, inputs: &[Tensor], grad_of: &[bool], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    for dtype in DTYPES {
        if !assert_close_to_cpu(name, inputs, grad_of, dtype, tol(dtype), &f) {
            return;
        }
    }
}

// ---------------------------------------------------------------- matmul

#[test]
fn matmul_odd_shapes() {
    for (i, &(m, k, n)) in [
        (1, 1, 1),
        (3, 5, 7),
        (37, 129, 65),
        (256, 256, 256),
        (65, 1, 3),
        (2, 300, 70),
    ]
    .iter()
    .enumerate()
    {
        let a = randn(&[m, k], 10 + i as u64);
        let b = randn(&[k, n], 20 + i as u64);
        check(
            &format!("matmul {m}x{k}x{n}"),
            &[a, b],
            &[true, true],
            |xs| xs[0].matmul(&xs[1]),
        );
    }
}

#[test]
fn matmul_long_reduction() {
    // k = 1000 (f32 sums of 1000 products in a different order than the CPU gemm; 1e-5
    // relative to the max is still met).
    let a = randn(&[17, 1000], 1);
    let b = randn(&[1000, 23], 2);
    check("matmul 17x1000x23", &[a, b], &[true, true], |xs| {
        xs[0].matmul(&xs[1])
    });
}

#[test]
fn matmul_batched_and_broadcast() {
    let a = randn(&[3, 33, 17], 1);
    let b = randn(&[3, 17, 9], 2);
    check("matmul batched", &[a.clone(), b], &[true, true], |xs| {
        xs[0].matmul(&xs[1])
    });
    // b broadcast over a's batch (dB sums the batch).
    let b2 = randn(&[17, 9], 3);
    check(
        "matmul a batched, b 2d",
        &[a.clone(), b2],
        &[true, true],
        |xs| xs[0].matmul(&xs[1]),
    );
    // a broadcast over b's batch (dA sums the batch).
    let a2 = randn(&[33, 17], 4);
    let b3 = randn(&[3, 17, 9], 5);
    check("matmul a 2d, b batched", &[a2, b3], &[true, true], |xs| {
        xs[0].matmul(&xs[1])
    });
    // Both broadcast: [2, 1, 5, 7] @ [3, 7, 4] -> [2, 3, 5, 4].
    let a4 = randn(&[2, 1, 5, 7], 6);
    let b4 = randn(&[3, 7, 4], 7);
    check("matmul broadcast both", &[a4, b4], &[true, true], |xs| {
        xs[0].matmul(&xs[1])
    });
    // Size-1 batch dim against a real one: [1, 6, 5] @ [4, 5, 3].
    let a5 = randn(&[1, 6, 5], 8);
    let b5 = randn(&[4, 5, 3], 9);
    check("matmul batch 1 vs 4", &[a5, b5], &[true, true], |xs| {
        xs[0].matmul(&xs[1])
    });
    // Only one operand needs a gradient.
    let a6 = randn(&[2, 9, 8], 10);
    let b6 = randn(&[2, 8, 11], 11);
    check("matmul grad of b only", &[a6, b6], &[false, true], |xs| {
        xs[0].matmul(&xs[1])
    });
}

#[test]
fn matmul_transposed_views() {
    // a given as [k, m] and b as [n, k]: both operands are transposed views (no copies).
    let at = randn(&[37, 21], 1);
    let bt = randn(&[19, 37], 2);
    check("matmul a.t() @ b.t()", &[at, bt], &[true, true], |xs| {
        xs[0].t()?.matmul(&xs[1].t()?)
    });
    let a = randn(&[21, 37], 3);
    let bt = randn(&[19, 37], 4);
    check("matmul a @ b.t()", &[a, bt], &[true, true], |xs| {
        xs[0].matmul(&xs[1].t()?)
    });
    // Batched transpose of the last two dims, and a permuted batch dim.
    let a = randn(&[3, 17, 33], 5);
    let b = randn(&[9, 3, 17], 6);
    check("matmul batched transposes", &[a, b], &[true, true], |xs| {
        xs[0].transpose(1, 2)?.matmul(&xs[1].permute(&[1, 2, 0])?)
    });
}

#[test]
fn linear_with_and_without_bias() {
    let x = randn(&[2, 5, 37], 1);
    let w = randn(&[19, 37], 2);
    let b = randn(&[19], 3);
    check(
        "linear bias",
        &[x.clone(), w.clone(), b],
        &[true, true, true],
        |xs| xs[0].linear(&xs[1], Some(&xs[2])),
    );
    check("linear no bias", &[x, w], &[true, true], |xs| {
        xs[0].linear(&xs[1], None)
    });
    // 1-d input, frozen weight, bias only.
    let x1 = randn(&[37], 4);
    let w1 = randn(&[3, 37], 5);
    let b1 = randn(&[3], 6);
    check("linear 1d", &[x1, w1, b1], &[true, false, true], |xs| {
        xs[0].linear(&xs[1], Some(&xs[2]))
    });
    // A transposed input view, Qwen-like widths with a bias (q/k/v projections).
    let xt = randn(&[128, 70], 7);
    let w = randn(&[256, 128], 8);
    let b = randn(&[256], 9);
    check(
        "linear x.t() 70x128 -> 256",
        &[xt, w, b],
        &[true, true, true],
        |xs| xs[0].t()?.linear(&xs[1], Some(&xs[2])),
    );
    // Many rows (the bias gradient's column sum runs in several chunks).
    let x = randn(&[3000, 8], 10);
    let w = randn(&[5, 8], 11);
    let b = randn(&[5], 12);
    check("linear 3000 rows", &[x, w, b], &[true, true, true], |xs| {
        xs[0].linear(&xs[1], Some(&xs[2]))
    });
    // Columns a multiple of 16 bytes: the bias gradient's 16-byte path, in many chunks.
    let x = randn(&[2000, 16], 13);
    let w = randn(&[24, 16], 14);
    let b = randn(&[24], 15);
    check(
        "linear 2000 rows -> 24",
        &[x, w, b],
        &[true, true, true],
        |xs| xs[0].linear(&xs[1], Some(&xs[2])),
    );
}

#[test]
fn linear_k_not_a_multiple_of_8() {
    // The vision MLP's shapes scaled down (intermediate 3420 -> 342): the tensor-core path pads
    // K with zero columns for down_proj's forward (K = 342) and for the input gradient of the
    // up projection (K = 342, the weight read transposed).
    let x = randn(&[96, 40], 31);
    let up = randn(&[342, 40], 32);
    let down = randn(&[40, 342], 33);
    let b = randn(&[40], 34);
    check(
        "linear 96x40 -> 342 -> 40",
        &[x, up, down, b],
        &[true, true, true, true],
        |xs| xs[0].linear(&xs[1], None)?.linear(&xs[2], Some(&xs[3])),
    );
}

#[test]
fn mixed_devices_are_an_error() {
    if cuda::device_or_skip("mixed_devices_are_an_error").is_none() {
        return;
    }
    let a = randn(&[3, 4], 1);
    let b = randn(&[4, 5], 2).to_cuda().unwrap();
    let e = a.matmul(&b).unwrap_err().to_string();
    assert!(e.contains("matmul"), "{e}");
    let e = b.t().unwrap().linear(&a, None).unwrap_err().to_string();
    assert!(e.contains("linear"), "{e}");
}

// ---------------------------------------------------------------- attention

fn attn_case(
    name: &str,
    (b, hq, hkv, tq, tk, d, dv): (usize, usize, usize, usize, usize, usize, usize),
    opts: AttentionOptions,
    seed: u64,
) {
    let q = randn(&[b, hq, tq, d], seed);
    let k = randn(&[b, hkv, tk, d], seed + 1);
    let v = randn(&[b, hkv, tk, dv], seed + 2);
    check(name, &[q, k, v], &[true, true, true], |xs| {
        let mut o = opts.clone();
        if let Some(m) = &o.key_padding {
            o.key_padding = Some(m.to_device(xs[0].device())?);
        }
        Tensor::attention(&xs[0], &xs[1], &xs[2], &o)
    });
}

#[test]
fn attention_head_dims() {
    for (i, d) in [8usize, 16, 32, 64, 80, 128].into_iter().enumerate() {
        attn_case(
            &format!("attention d={d}"),
            (2, 3, 3, 37, 37, d, d),
            AttentionOptions::default(),
            100 + 3 * i as u64,
        );
    }
    // Dv != D, head dim over 128 (several column chunks per lane), long key sequence.
    attn_case(
        "attention d=24 dv=40",
        (1, 2, 2, 5, 70, 24, 40),
        AttentionOptions::default(),
        150,
    );
    attn_case(
        "attention d=256",
        (1, 1, 1, 20, 33, 256, 256),
        AttentionOptions::default(),
        160,
    );
    attn_case(
        "attention tq=1",
        (2, 2, 1, 1, 45, 64, 64),
        AttentionOptions::default(),
        170,
    );
}

#[test]
fn attention_gqa_and_causal() {
    let causal = AttentionOptions {
        causal: true,
        ..Default::default()
    };
    attn_case(
        "attention gqa 4/2",
        (2, 4, 2, 33, 33, 64, 64),
        AttentionOptions::default(),
        200,
    );
    attn_case(
        "attention gqa causal",
        (2, 4, 2, 33, 33, 32, 32),
        causal.clone(),
        210,
    );
    // Bottom-right aligned: Tq < Tk (decode with a KV cache).
    attn_case(
        "attention causal tq<tk",
        (1, 4, 2, 7, 50, 64, 64),
        causal.clone(),
        220,
    );
    // Tq > Tk: the first Tq - Tk queries see no key and output zeros.
    attn_case(
        "attention causal tq>tk",
        (1, 2, 2, 40, 9, 16, 16),
        causal.clone(),
        230,
    );
    let scaled = AttentionOptions {
        causal: true,
        scale: Some(0.3),
        ..Default::default()
    };
    attn_case("attention scale 0.3", (1, 2, 1, 19, 19, 8, 8), scaled, 240);
}

#[test]
fn attention_key_padding() {
    let (b, tk) = (3, 41);
    let mut m = vec![1f32; b * tk];
    m[30..tk].fill(0.0); // batch 0: the last 11 keys are padding
    m[tk..tk + 5].fill(0.0); // batch 1: left padding
    m[2 * tk..].fill(0.0); // batch 2: everything padded -> zeros
    let mask = Tensor::from_vec(m, &[b, tk]).unwrap();
    let opts = AttentionOptions {
        key_padding: Some(mask.clone()),
        ..Default::default()
    };
    attn_case(
        "attention key padding",
        (b, 4, 2, 41, tk, 64, 64),
        opts,
        300,
    );
    let opts = AttentionOptions {
        causal: true,
        key_padding: Some(mask),
        ..Default::default()
    };
    attn_case(
        "attention key padding causal",
        (b, 2, 2, 41, tk, 32, 32),
        opts,
        310,
    );
}

#[test]
fn attention_cu_seqlens_segments() {
    let opts = AttentionOptions {
        cu_seqlens: Some(vec![0, 5, 5, 12, 45, 70]),
        ..Default::default()
    };
    attn_case("attention cu_seqlens", (1, 4, 2, 70, 70, 64, 64), opts, 400);
    let opts = AttentionOptions {
        cu_seqlens: Some(vec![0, 70]),
        causal: true,
        ..Default::default()
    };
    attn_case(
        "attention one segment causal",
        (1, 2, 2, 70, 70, 16, 16),
        opts,
        410,
    );
}

#[test]
fn attention_strided_inputs() {
    // q, k, v as [B, T, H, D] projections viewed as [B, H, T, D] (no copy on CUDA).
    let (b, t, hq, hkv, d) = (2, 29, 4, 2, 64);
    let q = randn(&[b, t, hq, d], 500);
    let k = randn(&[b, t, hkv, d], 501);
    let v = randn(&[b, t, hkv, d], 502);
    let opts = AttentionOptions {
        causal: true,
        ..Default::default()
    };
    check(
        "attention transposed views",
        &[q, k, v],
        &[true, true, true],
        |xs| {
            Tensor::attention(
                &xs[0].transpose(1, 2)?,
                &xs[1].transpose(1, 2)?,
                &xs[2].transpose(1, 2)?,
                &opts,
            )
        },
    );
}

#[test]
fn attention_qwen_shapes() {
    // Qwen2.5-VL-3B text: 16 query heads, 2 kv heads, head dim 128, causal, padded batch.
    let (b, t) = (2, 40);
    let mut m = vec![1f32; b * t];
    m[t..t + 7].fill(0.0);
    let mask = Tensor::from_vec(m, &[b, t]).unwrap();
    let opts = AttentionOptions {
        causal: true,
        key_padding: Some(mask),
        ..Default::default()
    };
    attn_case("attention qwen text", (b, 16, 2, t, t, 128, 128), opts, 600);
    // Vision tower: 16 heads, head dim 80, window segments.
    let opts = AttentionOptions {
        cu_seqlens: Some(vec![0, 16, 32, 64, 80, 100]),
        ..Default::default()
    };
    attn_case(
        "attention qwen vision",
        (1, 16, 16, 100, 100, 80, 80),
        opts,
        610,
    );
}

// ---------------------------------------------------------------- optimisers

fn params(seed: u64) -> Vec<Tensor> {
    [vec![37, 19], vec![1000], vec![5], vec![3, 4, 5]]
        .iter()
        .enumerate()
        .map(|(i, s)| randn(s, seed + i as u64))
        .collect()
}

fn on_cuda(ps: &[Tensor]) -> Vec<Tensor> {
    ps.iter()
        .map(|p| p.to_cuda().unwrap().requires_grad_())
        .collect()
}

fn on_cpu(ps: &[Tensor]) -> Vec<Tensor> {
    ps.iter().map(|p| p.detach().requires_grad_()).collect()
}

/// Sets the same gradient (scaled by `s`) on both copies; `skip` gets none.
fn set_grads(cpu_ps: &[Tensor], cuda_ps: &[Tensor], seed: u64, s: f64, skip: Option<usize>) {
    for (i, (a, b)) in cpu_ps.iter().zip(cuda_ps).enumerate() {
        a.zero_grad();
        b.zero_grad();
        if Some(i) == skip {
            continue;
        }
        let g = randn(a.shape(), seed + i as u64);
        let g = Tensor::from_vec(
            g.to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|x| x * s as f32)
                .collect(),
            a.shape(),
        )
        .unwrap();
        a.backward_with(&g).unwrap();
        b.backward_with(&g.to_cuda().unwrap()).unwrap();
    }
}

fn assert_same(what: &str, got: &[Tensor], want: &[Tensor], tol: f64) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_cuda(), "{what}: param {i} left the device");
        let e = rel_error(g, w).unwrap();
        assert!(e <= tol, "{what}: param {i} rel error {e:.3e} > {tol:e}");
    }
}

#[test]
fn adamw_steps_match_cpu() {
    if cuda::device_or_skip("adamw_steps_match_cpu").is_none() {
        return;
    }
    let init = params(1);
    let (pc, pg) = (on_cpu(&init), on_cuda(&init));
    let groups = |ps: &[Tensor]| {
        vec![
            ParamGroup::new(ps[..2].to_vec(), 0.1),
            ParamGroup::new(ps[2..].to_vec(), 0.0),
        ]
    };
    let config = AdamWConfig {
        betas: (0.9, 0.95),
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut oc = AdamW::with_groups(groups(&pc), config).unwrap();
    let mut og = AdamW::with_groups(groups(&pg), config).unwrap();
    for step in 0..4 {
        let skip = (step == 1).then_some(2);
        set_grads(&pc, &pg, 50 + 10 * step as u64, 1.0 + step as f64, skip);
        let lr = 1e-2 / (1.0 + step as f64);
        oc.step(lr).unwrap();
        og.step(lr).unwrap();
        assert_same(&format!("AdamW step {step}"), &pg, &pc, 1e-6);
    }
    // The state comes back on the CPU and matches; loading it resumes on the device.
    let (sc, sg) = (oc.state().unwrap(), og.state().unwrap());
    assert_eq!(sc.steps, sg.steps);
    for (i, (a, b)) in sc.params.iter().zip(&sg.params).enumerate() {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!(a.step, b.step, "param {i} step count");
        assert!(
            !b.exp_avg.is_cuda() && !b.exp_avg_sq.is_cuda(),
            "state() must be on the CPU"
        );
        assert!(rel_error(&b.exp_avg, &a.exp_avg).unwrap() <= 1e-6);
        assert!(rel_error(&b.exp_avg_sq, &a.exp_avg_sq).unwrap() <= 1e-6);
    }
    let pg2 = on_cuda(&pc.iter().map(|p| p.detach()).collect::<Vec<_>>());
    let mut og2 = AdamW::with_groups(groups(&pg2), config).unwrap();
    og2.load_state(&sg).unwrap();
    set_grads(&pc, &pg2, 99, 0.5, None);
    oc.step(3e-3).unwrap();
    og2.step(3e-3).unwrap();
    assert_same("AdamW after load_state", &pg2, &pc, 1e-6);
}

/// AdamW's bf16 compute copies (`compute_params`): the gradient reaches the f32 masters
/// through them; after every step (a parameter without a gradient included) each copy equals
/// the master cast to bf16 bit for bit, and the masters equal those of an optimiser without
/// copies fed the same gradients.
#[test]
fn adamw_compute_copies_follow_the_masters() {
    if cuda::device_or_skip("adamw_compute_copies").is_none() {
        return;
    }
    let init = params(7);
    let (pa, pb) = (on_cuda(&init), on_cuda(&init));
    let config = AdamWConfig::default();
    let mut oa = AdamW::new(pa.clone(), config).unwrap();
    let mut ob = AdamW::new(pb.clone(), config).unwrap();
    for step in 0..3 {
        let copies = oa.compute_params(DType::BF16).unwrap();
        for (i, (c, p)) in copies.iter().zip(&pa).enumerate() {
            assert_eq!(c.dtype(), DType::BF16);
            let cast = p.detach().to_dtype(DType::BF16).unwrap();
            let (c, cast) = (
                c.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap(),
                cast.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap(),
            );
            assert_eq!(
                c, cast,
                "step {step}: compute copy {i} differs from the cast"
            );
        }
        // loss = Σ_i Σ copy_i · g_i (g_i random), so master i's gradient is g_i (through the
        // copy's backward cast); parameter 2 gets none at step 1.
        for (i, (c, pb)) in copies.iter().zip(&pb).enumerate() {
            pa[i].zero_grad();
            pb.zero_grad();
            if step == 1 && i == 2 {
                continue;
            }
            let g = randn(c.shape(), 100 + 10 * step + i as u64)
                .to_cuda()
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            c.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            let gf = g.to_dtype(DType::F32).unwrap();
            pb.backward_with(&gf).unwrap();
            let e = rel_error(&pa[i].grad().unwrap(), &gf).unwrap();
            assert!(
                e == 0.0,
                "step {step}: gradient of master {i} off by {e:.2e}"
            );
        }
        oa.step(1e-2).unwrap();
        ob.step(1e-2).unwrap();
        assert_same(&format!("masters after step {step}"), &pa, &pb, 0.0);
    }
}

/// Two optimisers' states bit for bit: every parameter's update count and both moments.
fn assert_same_moments(oa: &AdamW, ob: &AdamW) {
    let (sa, sb) = (oa.state().unwrap(), ob.state().unwrap());
    for (i, (a, b)) in sa.params.iter().zip(&sb.params).enumerate() {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!(a.step, b.step, "param {i} step count");
        assert_eq!(
            rel_error(&b.exp_avg, &a.exp_avg).unwrap(),
            0.0,
            "param {i} exp_avg"
        );
        let e = rel_error(&b.exp_avg_sq, &a.exp_avg_sq).unwrap();
        assert_eq!(e, 0.0, "param {i} exp_avg_sq");
    }
}

/// AdamW's compute copies as leaves (`compute_leaves`): the bf16 gradients stay on the copies
/// and the fused update reads them (`adamw_f32_gbf16`). Against an optimiser with
/// `compute_params` (whose backward casts the gradients to the masters) fed the same loss
/// (each copy used twice, so its gradient sums two bf16 contributions): the copies' gradients
/// equal the masters' bit for bit, and after every step (a parameter without a gradient, and
/// one whose master has a gradient of its own, included) the masters and moments are
/// bit-equal and each copy is its master's cast.
#[test]
fn adamw_compute_leaves_update_as_compute_params() {
    if cuda::device_or_skip("adamw_compute_leaves").is_none() {
        return;
    }
    let init = params(17);
    let (pa, pb) = (on_cuda(&init), on_cuda(&init));
    let config = AdamWConfig::default();
    let mut oa = AdamW::new(pa.clone(), config).unwrap();
    let mut ob = AdamW::new(pb.clone(), config).unwrap();
    let leaves = ob.compute_leaves(DType::BF16).unwrap();
    for step in 0..3u64 {
        let casts = oa.compute_params(DType::BF16).unwrap();
        // loss = Σ_i Σ (c_i · g_i + c_i · c_i · h_i) in bf16, c_i the copy of parameter i.
        let loss = |cs: &[Tensor]| -> Tensor {
            let mut total: Option<Tensor> = None;
            for (i, c) in cs.iter().enumerate() {
                if step == 1 && i == 2 {
                    continue;
                }
                let g = randn(c.shape(), 200 + 10 * step + i as u64)
                    .to_cuda()
                    .unwrap();
                let h = randn(c.shape(), 300 + 10 * step + i as u64)
                    .to_cuda()
                    .unwrap();
                let (g, h) = (
                    g.to_dtype(DType::BF16).unwrap(),
                    h.to_dtype(DType::BF16).unwrap(),
                );
                let term = c
                    .mul(&g)
                    .unwrap()
                    .add(&c.mul(c).unwrap().mul(&h).unwrap())
                    .unwrap();
                let term = term.to_dtype(DType::F32).unwrap().sum_all().unwrap();
                total = Some(match total {
                    None => term,
                    Some(t) => t.add(&term).unwrap(),
                });
            }
            total.unwrap()
        };
        loss(&casts).backward().unwrap();
        loss(&leaves).backward().unwrap();
        if step == 2 {
            let extra = randn(pa[0].shape(), 77).to_cuda().unwrap();
            pa[0].backward_with(&extra).unwrap();
            pb[0].backward_with(&extra).unwrap();
        }
        for (i, (a, l)) in pa.iter().zip(&leaves).enumerate() {
            assert_eq!(l.dtype(), DType::BF16);
            match (a.grad(), l.grad()) {
                (None, None) => assert!(
                    step == 1 && i == 2,
                    "step {step}: param {i} lost its gradient"
                ),
                (Some(ga), Some(gl)) => {
                    let mut gl = gl.to_dtype(DType::F32).unwrap();
                    if let Some(gb) = pb[i].grad() {
                        gl = gb.add(&gl).unwrap();
                    }
                    let e = rel_error(&gl, &ga).unwrap();
                    assert!(e == 0.0, "step {step}: gradient {i} off by {e:.2e}");
                }
                (a, b) => panic!(
                    "step {step}: param {i}: gradient on master {} vs copy {}",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
        oa.step(1e-2).unwrap();
        ob.step(1e-2).unwrap();
        assert_same(&format!("masters after step {step}"), &pb, &pa, 0.0);
        for (i, (l, p)) in leaves.iter().zip(&pb).enumerate() {
            let cast = p.detach().to_dtype(DType::BF16).unwrap();
            let e = rel_error(l, &cast).unwrap();
            assert!(
                e == 0.0,
                "step {step}: copy {i} is not its master's cast ({e:.2e})"
            );
        }
        assert_same_moments(&oa, &ob);
        oa.zero_grad();
        ob.zero_grad();
    }
}

/// The multi-tensor AdamW (`set_multi_tensor`: every CUDA parameter in one launch, each block
/// finding its tensor in a table) against the per-tensor kernels, bit for bit: sizes around
/// the kernel's 8192-element blocks and far beyond, two weight decays, a parameter skipped at
/// one step (so the bias corrections differ between tensors), and gradients in f32 on the
/// masters for some parameters and in bf16 on the compute copies for the others, in one launch.
#[test]
fn adamw_multi_tensor_matches_per_tensor() {
    if cuda::device_or_skip("adamw_multi_tensor").is_none() {
        return;
    }
    let shapes: [&[usize]; 9] = [
        &[1],
        &[5],
        &[8191],
        &[8192],
        &[8193],
        &[37, 19],
        &[3, 4, 5],
        &[300, 300],
        &[2, 8192],
    ];
    let init: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| randn(s, 500 + i as u64))
        .collect();
    let (pa, pb) = (on_cuda(&init), on_cuda(&init));
    let groups = |ps: &[Tensor]| {
        vec![
            ParamGroup::new(ps[..4].to_vec(), 0.0),
            ParamGroup::new(ps[4..].to_vec(), 0.1),
        ]
    };
    let config = AdamWConfig::default();
    let mut oa = AdamW::with_groups(groups(&pa), config).unwrap();
    let mut ob = AdamW::with_groups(groups(&pb), config).unwrap();
    oa.set_multi_tensor(false);
    ob.set_multi_tensor(true);
    let (la, lb) = (
        oa.compute_leaves(DType::BF16).unwrap(),
        ob.compute_leaves(DType::BF16).unwrap(),
    );
    for step in 0..4u64 {
        for i in 0..shapes.len() {
            if step == 1 && i == 3 {
                continue;
            }
            let g = randn(shapes[i], 600 + 20 * step + i as u64)
                .to_cuda()
                .unwrap();
            if i % 2 == 0 {
                // f32 on the master
                pa[i].backward_with(&g).unwrap();
                pb[i].backward_with(&g).unwrap();
            } else {
                // bf16 on the compute copy
                let g = g.to_dtype(DType::BF16).unwrap();
                la[i].backward_with(&g).unwrap();
                lb[i].backward_with(&g).unwrap();
            }
        }
        oa.step(3e-3).unwrap();
        ob.step(3e-3).unwrap();
        assert_same(
            &format!("multi-tensor masters after step {step}"),
            &pb,
            &pa,
            0.0,
        );
        assert_same(
            &format!("multi-tensor copies after step {step}"),
            &lb,
            &la,
            0.0,
        );
        assert_same_moments(&oa, &ob);
        oa.zero_grad();
        ob.zero_grad();
    }
}

#[test]
fn sgd_steps_match_cpu() {
    if cuda::device_or_skip("sgd_steps_match_cpu").is_none() {
        return;
    }
    let configs = [
        SgdConfig {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        },
        SgdConfig {
            momentum: 0.9,
            dampening: 0.1,
            nesterov: false,
            weight_decay: 0.01,
        },
        SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 0.05,
        },
    ];
    for (ci, config) in configs.into_iter().enumerate() {
        let init = params(7 + ci as u64);
        let (pc, pg) = (on_cpu(&init), on_cuda(&init));
        let mut oc = Sgd::new(pc.clone(), config).unwrap();
        let mut og = Sgd::new(pg.clone(), config).unwrap();
        for step in 0..3 {
            set_grads(&pc, &pg, 70 + step as u64, 1.0, (step == 1).then_some(0));
            oc.step(0.05).unwrap();
            og.step(0.05).unwrap();
            assert_same(&format!("SGD config {ci} step {step}"), &pg, &pc, 1e-6);
        }
        let st = og.state().unwrap();
        let mut og2 = Sgd::new(pg.clone(), config).unwrap();
        og2.load_state(&st).unwrap();
    }
}

#[test]
fn clip_grad_norm_matches_cpu() {
    if cuda::device_or_skip("clip_grad_norm_matches_cpu").is_none() {
        return;
    }
    for (max_norm, scale) in [(1.0, 1.0), (1e3, 1.0), (0.5, 30.0)] {
        let init = params(31);
        let (pc, pg) = (on_cpu(&init), on_cuda(&init));
        set_grads(&pc, &pg, 40, scale, Some(3));
        let nc = clip_grad_norm(&pc, max_norm).unwrap();
        let ng = clip_grad_norm(&pg, max_norm).unwrap();
        assert!(((nc - ng) / nc).abs() <= 1e-12, "norm {ng} vs cpu {nc}");
        for (i, (a, b)) in pc.iter().zip(&pg).enumerate() {
            match (a.grad(), b.grad()) {
                (None, None) => {}
                (Some(a), Some(b)) => {
                    assert!(b.is_cuda());
                    let e = rel_error(&b, &a).unwrap();
                    assert!(
                        e <= 1e-6,
                        "clip max_norm {max_norm}: grad {i} rel error {e:.3e}"
                    );
                }
                _ => panic!("grad {i}: presence differs"),
            }
        }
    }
    // bf16 gradients on the device, and a mix of CPU and CUDA parameters.
    let init = params(61);
    let rounded: Vec<Tensor> = init
        .iter()
        .map(|t| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        })
        .collect();
    let pc = on_cpu(&rounded);
    let pg: Vec<Tensor> = rounded
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i == 0 {
                p.detach().requires_grad_() // stays on the CPU
            } else {
                p.to_device(Device::Cuda)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .requires_grad_()
            }
        })
        .collect();
    for (i, (a, b)) in pc.iter().zip(&pg).enumerate() {
        let g = randn(a.shape(), 80 + i as u64)
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        a.backward_with(&g).unwrap();
        b.backward_with(
            &g.to_device(b.device())
                .unwrap()
                .to_dtype(b.dtype())
                .unwrap(),
        )
        .unwrap();
    }
    let nc = clip_grad_norm(&pc, 1.0).unwrap();
    let ng = clip_grad_norm(&pg, 1.0).unwrap();
    assert!(
        ((nc - ng) / nc).abs() <= 1e-12,
        "bf16 norm {ng} vs cpu {nc}"
    );
    for (i, (a, b)) in pc.iter().zip(&pg).enumerate() {
        let e = rel_error(&b.grad().unwrap(), &a.grad().unwrap()).unwrap();
        assert!(e <= 1e-2, "bf16 clip: grad {i} rel error {e:.3e}");
    }
}

/// Rough timings of the simple kernels (run explicitly: `--ignored --nocapture`).
#[test]
#[ignore]
fn timing_report() {
    let Some(dev) = cuda::device_or_skip("timing_report") else {
        return;
    };
    for dtype in DTYPES {
        let n = 2048;
        let a = randn(&[n, n], 1)
            .to_cuda()
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let b = randn(&[n, n], 2)
            .to_cuda()
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        a.matmul(&b).unwrap();
        let ms = dev
            .time_ms(|| {
                for _ in 0..5 {
                    a.matmul(&b)?;
                }
                Ok(())
            })
            .unwrap()
            / 5.0;
        let tflops = 2.0 * (n * n * n) as f64 / (ms as f64 * 1e-3) / 1e12;
        println!("gemm {n}^3 {dtype}: {ms:.3} ms, {tflops:.1} TFLOP/s");
        let (bb, h, t, d) = (1, 16, 2048, 128);
        let q = randn(&[bb, h, t, d], 3)
            .to_cuda()
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .requires_grad_();
        let k = randn(&[bb, 2, t, d], 4)
            .to_cuda()
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .requires_grad_();
        let v = randn(&[bb, 2, t, d], 5)
            .to_cuda()
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .requires_grad_();
        let opts = AttentionOptions {
            causal: true,
            ..Default::default()
        };
        let up = randn(&[bb, h, t, d], 6)
            .to_cuda()
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let fwd = dev
            .time_ms(|| tessera::no_grad(|| Tensor::attention(&q, &k, &v, &opts)).map(|_| ()))
            .unwrap();
        let out = Tensor::attention(&q, &k, &v, &opts).unwrap();
        let bwd = dev
            .time_ms(|| tessera::grad(&out, Some(&up), &[&q, &k, &v]).map(|_| ()))
            .unwrap();
        let flops = 4.0 * (bb * h * t * t * d) as f64 / 2.0; // causal: half the pairs
        println!(
            "attention causal B{bb} H{h}/2 T{t} D{d} {dtype}: fwd {fwd:.3} ms ({:.1} TFLOP/s), bwd {bwd:.3} ms",
            flops / (fwd as f64 * 1e-3) / 1e12
        );
    }
}
