//! Criterion benchmarks of the CPU kernels: matmul, rmsnorm, attention, softmax,
//! cross-entropy (forward, and forward+backward where training uses it).
//! For the ratio against PyTorch on the same machine: `python3 tools/bench/cpu_vs_torch.py`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use tessera::ops::attention::AttentionOptions;
use tessera::{no_grad, DType, Rng, Tensor};

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 1.0, DType::F32, rng).unwrap()
}

fn matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_f32");
    let mut rng = Rng::new(0);
    for &(m, k, n) in &[(512, 512, 512), (1024, 1024, 1024), (4096, 2048, 256)] {
        let (a, b) = (randn(&[m, k], &mut rng), randn(&[k, n], &mut rng));
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        g.bench_function(format!("{m}x{k}x{n}"), |bench| {
            bench.iter(|| a.matmul(&b).unwrap())
        });
    }
    g.finish();
}

fn fused(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("fused_f32");
    let x = randn(&[4096, 1024], &mut rng);
    let w = randn(&[1024], &mut rng);
    g.bench_function("rmsnorm_fwd_4096x1024", |b| {
        b.iter(|| no_grad(|| x.rms_norm(&w, 1e-6).unwrap()))
    });
    let (xl, wl) = (x.requires_grad_(), w.requires_grad_());
    g.bench_function("rmsnorm_fwd_bwd_4096x1024", |b| {
        b.iter(|| {
            xl.rms_norm(&wl, 1e-6)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            xl.zero_grad();
            wl.zero_grad();
        })
    });
    g.bench_function("softmax_fwd_4096x1024", |b| {
        b.iter(|| no_grad(|| x.softmax(-1).unwrap()))
    });
    let logits = randn(&[2048, 8192], &mut rng);
    let targets = Tensor::from_vec(
        (0..2048)
            .map(|i| (i * 7919 % 8192) as i64)
            .collect::<Vec<_>>(),
        &[2048],
    )
    .unwrap();
    g.bench_function("cross_entropy_fwd_2048x8192", |b| {
        b.iter(|| no_grad(|| logits.cross_entropy(&targets, -100).unwrap()))
    });
    let ll = logits.requires_grad_();
    g.bench_function("cross_entropy_fwd_bwd_2048x8192", |b| {
        b.iter(|| {
            ll.cross_entropy(&targets, -100)
                .unwrap()
                .backward()
                .unwrap();
            ll.zero_grad();
        })
    });
    let (q, k, v) = (
        randn(&[2, 8, 512, 64], &mut rng),
        randn(&[2, 8, 512, 64], &mut rng),
        randn(&[2, 8, 512, 64], &mut rng),
    );
    let opts = AttentionOptions {
        causal: true,
        ..Default::default()
    };
    g.bench_function("attention_fwd_2x8x512x64_causal", |b| {
        b.iter(|| no_grad(|| Tensor::attention(&q, &k, &v, &opts).unwrap()))
    });
    let (ql, kl, vl) = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_());
    g.bench_function("attention_fwd_bwd_2x8x512x64_causal", |b| {
        b.iter(|| {
            Tensor::attention(&ql, &kl, &vl, &opts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            [&ql, &kl, &vl].iter().for_each(|t| t.zero_grad());
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group!(name = benches; config = config(); targets = matmul, fused);
criterion_main!(benches);
