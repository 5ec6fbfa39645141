//! Criterion benchmarks of the CUDA kernels, beside their references in the same run:
//! - `gemm_bf16`: `Tensor::matmul` at the 3B model's shapes (forward, and the weight
//!   gradients' layout with A stored transposed) against cuBLAS on the same operands
//!   (`--gemm cublas`); throughput in elements is FLOPs;
//! - `attention_bf16`: causal flash attention forward and forward + backward;
//! - `memory_bf16`: the memory-bound kernels at 16384 x 4096 against a device-to-device copy;
//!   throughput in bytes is the minimum each must move;
//! - `train_step`: one training step (forward, backward, AdamW) of `models/bench-tiny` in bf16.
//!
//! Each iteration's work is timed by CUDA events around the calls (`iter_custom`), so the time
//! is the device's, not the host's launch loop. Without a GPU the bench says so and exits.
//! `cargo bench --bench cuda_kernels -- gemm` runs one group; PyTorch's numbers for the same
//! shapes come from tools/gpu/torch_baselines.py (the GPU check runs both).

use criterion::{Criterion, Throughput};
use std::time::Duration;
use tessera::backend::cuda::{self, gemm_tc};
use tessera::ops::attention::AttentionOptions;
use tessera::{no_grad, DType, Result, Rng, Tensor};

/// Criterion's custom timing: `iters` calls of `f` between two CUDA events.
fn device_time(iters: u64, f: &mut impl FnMut() -> Result<()>) -> Duration {
    let dev = cuda::device().expect("cuda device");
    let ms = dev
        .time_ms(|| (0..iters).try_for_each(|_| f()))
        .expect("cuda work");
    Duration::from_secs_f64(ms as f64 * 1e-3)
}

fn rand_bf16(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 1.0, DType::F32, rng)
        .and_then(|t| t.to_cuda())
        .and_then(|t| t.to_dtype(DType::BF16))
        .expect("random bf16 tensor on the device")
}

fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm_bf16");
    let mut rng = Rng::new(0);
    // (m, k, n): the forward's x W^T shapes, then the weight gradients' (m outputs, k tokens).
    let shapes = [
        (4096, 2048, 2048),
        (4096, 2048, 256),
        (4096, 2048, 11008),
        (4096, 11008, 2048),
        (2048, 4096, 2048),
        (11008, 4096, 2048),
    ];
    let cublas = cuda::cublas_version();
    if let Err(e) = &cublas {
        eprintln!("gemm_bf16: no cuBLAS rows: {e}");
    }
    for (m, k, n) in shapes {
        let (a, b) = (rand_bf16(&[m, k], &mut rng), rand_bf16(&[k, n], &mut rng));
        // A stored transposed ([k, m]) too, read through a view: the weight gradients' Gᵀ X.
        let at = a
            .t()
            .and_then(|t| t.contiguous()?.t())
            .expect("transposed copy");
        g.throughput(Throughput::Elements(2 * (m * k * n) as u64));
        let id = format!("{m}x{k}x{n}");
        for (layout, a_view) in [("", &a), ("_a_stored_t", &at)] {
            g.bench_function(format!("tessera/{id}{layout}"), |bench| {
                bench.iter_custom(|n| device_time(n, &mut || a_view.matmul(&b).map(|_| ())))
            });
            if cublas.is_ok() {
                g.bench_function(format!("cublas/{id}{layout}"), |bench| {
                    bench.iter_custom(|n| {
                        gemm_tc::with_gemm_choice("cublas", || {
                            Ok(device_time(n, &mut || a_view.matmul(&b).map(|_| ())))
                        })
                        .expect("cublas")
                    })
                });
            }
        }
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention_bf16");
    let mut rng = Rng::new(1);
    let opts = AttentionOptions {
        causal: true,
        ..Default::default()
    };
    for (b, h, t, d) in [(4, 16, 1024, 128), (4, 16, 2048, 64)] {
        let [q, k, v] = [0; 3].map(|_| rand_bf16(&[b, h, t, d], &mut rng));
        // Causal: half of the 4·b·h·t²·d FLOPs of the two products.
        let flops = 2 * b * h * t * t * d;
        let id = format!("{b}x{h}x{t}x{d}");
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(format!("fwd/{id}"), |bench| {
            bench.iter_custom(|n| {
                device_time(n, &mut || {
                    no_grad(|| Tensor::attention(&q, &k, &v, &opts)).map(|_| ())
                })
            })
        });
        let dout = rand_bf16(&[b, h, t, d], &mut rng);
        // Forward + backward: 2.5x the forward's products.
        g.throughput(Throughput::Elements((flops * 7 / 2) as u64));
        g.bench_function(format!("fwd_bwd/{id}"), |bench| {
            bench.iter_custom(|n| {
                device_time(n, &mut || {
                    let [q, k, v] = [&q, &k, &v].map(|t| t.detach().requires_grad_());
                    let o = Tensor::attention(&q, &k, &v, &opts)?;
                    tessera::grad(&o, Some(&dout), &[&q, &k, &v]).map(|_| ())
                })
            })
        });
    }
    g.finish();
}

fn memory(c: &mut Criterion) {
    let mut g = c.benchmark_group("memory_bf16");
    let mut rng = Rng::new(2);
    let (rows, cols) = (16384, 4096);
    let n = rows * cols;
    let x = rand_bf16(&[rows, cols], &mut rng);
    let up = rand_bf16(&[rows, cols], &mut rng);
    let w = rand_bf16(&[cols], &mut rng);
    let dev = cuda::device().expect("cuda device");
    let dst = Tensor::empty_cuda(&[rows, cols], DType::BF16).expect("buffer");
    let (src_ptr, dst_ptr) = (x.cuda_ptr().expect("ptr"), dst.cuda_ptr().expect("ptr"));
    let targets = Tensor::from_vec(
        (0..rows)
            .map(|i| (i * 7919 % cols) as i64)
            .collect::<Vec<_>>(),
        &[rows],
    )
    .and_then(|t| t.to_cuda())
    .expect("targets");
    // rope on [1, 32, 16384, 128] (the same element count), cos/sin [16384, 128] broadcast.
    let q = x
        .reshape(&[1, 32, rows * cols / (32 * 128), 128])
        .expect("view");
    let t = rows * cols / (32 * 128);
    let (cos, sin) = (
        rand_bf16(&[t, 128], &mut rng),
        rand_bf16(&[t, 128], &mut rng),
    );
    // (name, bytes moved in units of n bf16 elements, the op)
    type Op<'a> = Box<dyn FnMut() -> Result<()> + 'a>;
    let ops: Vec<(&str, usize, Op)> = vec![
        ("copy", 2, Box::new(|| dev.dtod(src_ptr, dst_ptr, n * 2))),
        (
            "rms_norm",
            2,
            Box::new(|| no_grad(|| x.rms_norm(&w, 1e-6)).map(|_| ())),
        ),
        (
            "softmax",
            2,
            Box::new(|| no_grad(|| x.softmax(-1)).map(|_| ())),
        ),
        (
            "swiglu",
            3,
            Box::new(|| no_grad(|| x.swiglu(&up)).map(|_| ())),
        ),
        (
            "rope",
            2,
            Box::new(|| no_grad(|| q.rope(&cos, &sin)).map(|_| ())),
        ),
        (
            "cross_entropy",
            1,
            Box::new(|| no_grad(|| x.cross_entropy(&targets, -100)).map(|_| ())),
        ),
    ];
    for (name, units, mut op) in ops {
        g.throughput(Throughput::Bytes((units * n * 2) as u64));
        g.bench_function(format!("{name}/{rows}x{cols}"), |bench| {
            bench.iter_custom(|iters| device_time(iters, &mut op))
        });
    }
    g.finish();
}

fn train_step(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/bench-tiny");
    let mut step = tessera::cli::bench::TrainStep::new(
        &dir,
        (8, 256, [224, 224]),
        tessera::Device::Cuda,
        DType::BF16,
        false,
    )
    .expect("bench-tiny on the device");
    let mut g = c.benchmark_group("train_step");
    g.throughput(Throughput::Elements(8 * 256));
    // From an idle device to the loss on the host, as `bench step` and PyTorch's are timed:
    // elements are tokens.
    g.bench_function("bench-tiny/8x256+224x224/bf16", |bench| {
        bench.iter(|| step.issue().and_then(|l| l.to_scalar()).expect("step"))
    });
    g.finish();
}

fn main() {
    if let Err(e) = cuda::device() {
        eprintln!("cuda_kernels: skipped, no GPU: {e}");
        return;
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    gemm(&mut c);
    attention(&mut c);
    memory(&mut c);
    train_step(&mut c);
    c.final_summary();
}
