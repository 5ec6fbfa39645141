//! The tensor-core flash-attention forward (kernels/flash.cu) against the CPU attention on
//! fresh random bf16-rounded inputs: output and logsumexp within 2e-2. Skips without a GPU.

use tessera::backend::cuda::{self, flash};
use tessera::ops::attention::AttentionOptions;
use tessera::testing::cuda::{randn, rel_error};
use tessera::{DType, Tensor};

fn round(t: Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn case(b: usize, hq: usize, hkv: usize, tq: usize, tk: usize, d: usize, causal: bool) {
    if cuda::device_or_skip("flash_fwd").is_none() {
        return;
    }
    let q = round(randn(&[b, hq, tq, d], 1));
    let k = round(randn(&[b, hkv, tk, d], 2));
    let v = round(randn(&[b, hkv, tk, d], 3));
    let scale = 1.0 / (d as f64).sqrt();
    let opts = AttentionOptions {
        causal,
        ..Default::default()
    };
    let want = Tensor::attention(&q, &k, &v, &opts).unwrap();
    let on = |t: &Tensor| t.to_cuda().unwrap().to_dtype(DType::BF16).unwrap();
    let (o, lse) = flash::flash_fwd(&on(&q), &on(&k), &on(&v), causal, scale).unwrap();
    let e = rel_error(&o, &want).unwrap();
    // logsumexp on the CPU, from the scores.
    let s = q
        .matmul(&k.repeat_kv(hq / hkv))
        .unwrap()
        .mul_scalar(scale)
        .unwrap();
    let s = if causal {
        let off = tk as isize - tq as isize;
        let mask: Vec<u32> = (0..tq * tk)
            .map(|i| ((i % tk) as isize > (i / tk) as isize + off) as u32)
            .collect();
        s.masked_fill(
            &Tensor::from_vec(mask, &[tq, tk])
                .unwrap()
                .expand(s.shape())
                .unwrap(),
            f64::NEG_INFINITY,
        )
        .unwrap()
    } else {
        s
    };
    let want_lse = s.logsumexp(-1, false).unwrap();
    let lse_cpu = lse.to_cpu().unwrap();
    let el = {
        let (a, w) = (lse_cpu.to_f64s().unwrap(), want_lse.to_f64s().unwrap());
        a.iter().zip(&w).fold(0f64, |m, (x, y)| {
            if x.is_infinite() && y.is_infinite() {
                m
            } else {
                m.max((x - y).abs())
            }
        })
    };
    println!("flash b{b} hq{hq} hkv{hkv} tq{tq} tk{tk} d{d} causal={causal}: out rel {e:.2e}, lse abs {el:.2e}");
    assert!(e <= 2e-2, "flash output rel error {e}");
    assert!(el <= 2e-2, "flash lse abs error {el}");
}

trait RepeatKv {
    fn repeat_kv(&self, n: usize) -> Tensor;
}
impl RepeatKv for Tensor {
    /// [B, Hkv, T, D] -> [B, Hkv*n, D, T] (transposed for the score product).
    fn repeat_kv(&self, n: usize) -> Tensor {
        let (b, h, t, d) = (
            self.dim(0).unwrap(),
            self.dim(1).unwrap(),
            self.dim(2).unwrap(),
            self.dim(3).unwrap(),
        );
        self.unsqueeze(2)
            .unwrap()
            .expand(&[b, h, n, t, d])
            .unwrap()
            .reshape(&[b, h * n, t, d])
            .unwrap()
            .transpose(2, 3)
            .unwrap()
    }
}

#[test]
fn flash_fwd_matches_cpu() {
    case(1, 2, 2, 64, 64, 64, false);
    case(2, 4, 2, 37, 37, 64, true);
    case(1, 4, 1, 100, 129, 128, true);
    case(1, 2, 2, 129, 100, 80, false);
    case(2, 2, 1, 200, 200, 80, true);
    case(1, 3, 3, 1, 77, 128, true);
    case(1, 2, 2, 70, 50, 64, true); // early rows see no key
}

/// `Tensor::attention` in bf16 without padding/segments takes the flash forward and the
/// flash backward (dK/dV and dQ kernels); output and all three gradients match the CPU.
#[test]
fn attention_op_uses_flash_and_grads_match() {
    use tessera::testing::cuda::{assert_close_to_cpu, tol};
    for &(b, hq, hkv, tq, tk, d, causal) in &[
        (2usize, 4usize, 2usize, 37usize, 37usize, 64usize, true),
        (1, 2, 1, 20, 45, 128, true),
        (1, 2, 2, 33, 33, 80, false),
        (1, 4, 1, 130, 200, 64, true),
        (2, 2, 2, 100, 100, 128, false),
        (1, 2, 2, 70, 50, 64, true),
    ] {
        let q = randn(&[b, hq, tq, d], 11);
        let k = randn(&[b, hkv, tk, d], 12);
        let v = randn(&[b, hkv, tk, d], 13);
        let opts = AttentionOptions {
            causal,
            ..Default::default()
        };
        assert_close_to_cpu(
            &format!("attention(flash fwd) b{b} hq{hq} hkv{hkv} tq{tq} tk{tk} d{d}"),
            &[q, k, v],
            &[true, true, true],
            DType::BF16,
            tol(DType::BF16) * 2.0,
            |x| Tensor::attention(&x[0], &x[1], &x[2], &opts),
        );
    }
}
