//! `tessera bench`: timings of the products, fused ops, training step and forward, on the CPU
//! or CUDA, as a table or JSON lines (`bench cuda`: src/cli/bench_cuda.rs).

use crate::{DType, Error, Result, Rng, Tensor};
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to time: matmul (GFLOP/s of square and LLM-shaped f32 products), ops (the
    /// fused model ops, forward and forward+backward, at fixed shapes), step, forward, or
    /// cuda (memory-bound CUDA kernels' bandwidth against a device copy).
    #[arg(default_value = "matmul")]
    what: String,
    /// Matrix sizes for matmul, as MxKxN or a single N for square.
    #[arg(long, value_delimiter = ',', default_values_t = ["512".to_string(), "1024".to_string(), "2048".to_string(), "4096x2048x256".to_string()])]
    sizes: Vec<String>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// step: model directory (its config.json; weights are random).
    #[arg(long, default_value = "models/bench-tiny")]
    model: std::path::PathBuf,
    /// step: samples per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// step: tokens per sample, image tokens included.
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// step: image height,width in pixels (multiples of 28), one image per sample.
    #[arg(long, default_value = "112,112", value_delimiter = ',')]
    image: Vec<usize>,
    /// step: timed steps (after one warm-up step).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// step: activation checkpointing (each decoder layer and vision block computed again in
    /// the backward; for configs whose activations do not fit, such as the whole 3B model).
    #[arg(long)]
    checkpoint: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cuda: rows of the memory-bound kernels' input.
    #[arg(long, default_value_t = 16384)]
    rows: usize,
    /// cuda: columns (hidden size / vocabulary) of the memory-bound kernels' input.
    #[arg(long, default_value_t = 4096)]
    cols: usize,
}

/// Median seconds of `f` over enough repetitions to fill about `budget` seconds.
pub fn time_median(budget: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let t0 = Instant::now();
    f()?;
    let once = t0.elapsed().as_secs_f64().max(1e-6);
    let reps = ((budget / once) as usize).clamp(3, 200);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

/// A random [rows, cols] matrix of `dtype` on the CUDA device for `bench matmul`. Up to 2^24
/// entries it is all fresh N(0, 1) values; a larger one (the lm head's [4096, 151936] logit
/// gradient, 622 M entries, would take the host tens of seconds to draw) repeats a random block
/// of at most 2^24 entries down its rows, which times the same as fresh values.
fn cuda_bench_matrix(rows: usize, cols: usize, dtype: DType, rng: &mut Rng) -> Result<Tensor> {
    bench_matrix(rows, cols, 1 << 24, dtype, crate::Device::Cuda, rng)
}

/// `cuda_bench_matrix` on `device`, with blocks of at most `max_block` entries.
fn bench_matrix(
    rows: usize,
    cols: usize,
    max_block: usize,
    dtype: DType,
    device: crate::Device,
    rng: &mut Rng,
) -> Result<Tensor> {
    let block_rows = rows.min(max_block / cols.max(1)).max(1);
    let block = Tensor::randn(&[block_rows, cols], 1.0, DType::F32, rng)?
        .to_device(device)?
        .to_dtype(dtype)?;
    if block_rows == rows {
        return Ok(block);
    }
    let parts = vec![&block; rows.div_ceil(block_rows)];
    Tensor::cat(&parts, 0)?.narrow(0, 0, rows)?.contiguous()
}

/// Whether `bench matmul --device cuda` times cuBLAS beside tessera, saying which cuBLAS on
/// stderr: not without libcublas, nor with TESSERA_BENCH_SKIP_CUBLAS=1 (the GPU check, when
/// the cuBLAS test failed).
fn cublas_rows() -> bool {
    if std::env::var_os("TESSERA_BENCH_SKIP_CUBLAS").is_some() {
        eprintln!("bench matmul: no cuBLAS rows (TESSERA_BENCH_SKIP_CUBLAS)");
        return false;
    }
    let version = crate::backend::cuda::cublas_version();
    match &version {
        Ok(v) => eprintln!("bench matmul: cuBLAS {v}"),
        Err(e) => eprintln!("bench matmul: no cuBLAS rows: {e}"),
    }
    version.is_ok()
}

fn parse_size(s: &str) -> Result<(usize, usize, usize)> {
    let dims: Vec<usize> = s
        .split('x')
        .map(|d| d.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::msg(format!("bench: bad size '{s}' (want N or MxKxN)")))?;
    match dims[..] {
        [n] => Ok((n, n, n)),
        [m, k, n] => Ok((m, k, n)),
        _ => Err(Error::msg(format!(
            "bench: bad size '{s}' (want N or MxKxN)"
        ))),
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what.as_str() {
        "matmul" => {
            let mut rng = Rng::new(0);
            let cublas = a.device == "cuda" && cublas_rows();
            for s in &a.sizes {
                let (m, k, n) = parse_size(s)?;
                if a.device == "cuda" {
                    let dtype: DType = a.dtype.parse()?;
                    let x = cuda_bench_matrix(m, k, dtype, &mut rng)?;
                    let y = cuda_bench_matrix(k, n, dtype, &mut rng)?;
                    let dev = crate::backend::cuda::device()?;
                    // Event pairs per timing: 5 for the lm head's products (2.5 TFLOP a call).
                    let reps = if 2.0 * (m * k * n) as f64 > 1e12 {
                        5
                    } else {
                        10
                    };
                    // One JSON row: the op, its median ms per call (10 calls per event pair, as
                    // the PyTorch baseline times them) and TFLOP/s, then `extra` fields.
                    let row = |label: &str, ms: f64, extra: &str| {
                        let tflops = 2.0 * (m * k * n) as f64 / (ms * 1e-3) / 1e12;
                        println!(
                            "{{\"op\": \"{label}\", \"device\": \"cuda\", \"dtype\": \"{dtype}\", \"m\": {m}, \"k\": {k}, \"n\": {n}, \"ms\": {ms:.4}, \"tflops\": {tflops:.2}{extra}}}"
                        );
                    };
                    // A stored transposed: xt.t() is A as the weight gradients read it.
                    let xt = x.t()?.contiguous()?;
                    // `Tensor::matmul` under whatever switch is set: ms in the forward's layout
                    // and in the weight gradients' (Aᵀ stored).
                    let fwd_and_wgrad = || -> Result<(f64, f64)> {
                        Ok((
                            super::bench_cuda::time_ms(reps, || x.matmul(&y).map(|_| ()))?,
                            super::bench_cuda::time_ms(reps, || xt.t()?.matmul(&y).map(|_| ()))?,
                        ))
                    };
                    row(
                        "matmul",
                        super::bench_cuda::time_ms(reps, || x.matmul(&y).map(|_| ()))?,
                        "",
                    );
                    // The reference in the same process: cuBLAS on the same operands, in both
                    // layouts.
                    use crate::backend::cuda::gemm_tc::with_gemm_choice;
                    if cublas {
                        match with_gemm_choice("cublas", fwd_and_wgrad) {
                            Ok((fwd, wgrad)) => {
                                row("matmul_cublas", fwd, "");
                                row("matmul_cublas_mn_ab", wgrad, "");
                            }
                            Err(e) => eprintln!("bench matmul: cuBLAS at {m}x{k}x{n}: {e}"),
                        }
                    }
                    // Where the wave model picks another tile width than the old rule
                    // (`TESSERA_GEMM_BN=0`), the product under the old rule too, in both the
                    // forward's layout and the weight gradients' (Aᵀ stored, both MN-major).
                    use crate::backend::cuda::gemm_tc::{set_block_n_rule, ws_block_n_by};
                    let sms = dev.sm_count as usize;
                    let (model_bn, old_bn) = (
                        ws_block_n_by(true, m, n, 1, sms).0,
                        ws_block_n_by(false, m, n, 1, sms).0,
                    );
                    // (TESSERA_BENCH_SKIP_WS / _MN: left out when the ws GEMM or its MN-major
                    // mode failed its test, as below.)
                    if dev.cc == (9, 0)
                        && dtype == DType::BF16
                        && old_bn != model_bn
                        && std::env::var_os("TESSERA_BENCH_SKIP_WS").is_none()
                        && std::env::var_os("TESSERA_BENCH_SKIP_MN").is_none()
                    {
                        set_block_n_rule(Some(0));
                        let timed = fwd_and_wgrad();
                        set_block_n_rule(None);
                        let (fwd, wgrad) = timed?;
                        let extra = format!(", \"bn\": {old_bn}, \"bn_model\": {model_bn}");
                        row("matmul_bn_old", fwd, &extra);
                        row("matmul_mn_ab_bn_old", wgrad, &extra);
                    }
                    if dtype == DType::BF16 && k.is_multiple_of(8) {
                        // The tensor-core kernel directly, B given as [N, K] (nn.Linear layout).
                        let bt = y.t()?.contiguous()?;
                        use crate::backend::cuda::gemm_tc::{matmul_bt_with, TcKernel};
                        let mut kernels = vec![("matmul_tc", TcKernel::MmaSync)];
                        if dev.cc == (9, 0) {
                            kernels.push(("matmul_wgmma", TcKernel::Wgmma));
                            // TESSERA_BENCH_SKIP_WS=1: the GPU check leaves out a kernel
                            // that failed its tests.
                            if std::env::var_os("TESSERA_BENCH_SKIP_WS").is_none() {
                                kernels.push(("matmul_wgmma_ws", TcKernel::WgmmaWs));
                                // The TMA-store epilogue (TESSERA_BENCH_SKIP_TS=1: left out
                                // when its test failed), and the mainloop without stores.
                                if std::env::var_os("TESSERA_BENCH_SKIP_TS").is_none() {
                                    kernels.push(("matmul_wgmma_ws_ts", TcKernel::WgmmaWsTma));
                                }
                                kernels.push(("matmul_wgmma_ws_nostore", TcKernel::WgmmaWs));
                            }
                        }
                        use crate::backend::cuda::gemm_tc::set_skip_stores_for_benchmark;
                        for (label, kernel) in kernels {
                            let skip = label.ends_with("_nostore");
                            set_skip_stores_for_benchmark(skip);
                            let ms = super::bench_cuda::time_ms(reps, || {
                                matmul_bt_with(kernel, &x, &bt, None).map(|_| ())
                            });
                            set_skip_stores_for_benchmark(false);
                            row(label, ms?, "");
                        }
                        // `Tensor::matmul` with the GEMM's MN-major mode: B [K, N] read as
                        // stored (the backward's G · W), then A given as Aᵀ [K, M] too (its
                        // Gᵀ · X). TESSERA_BENCH_SKIP_MN=1: left out when its test failed.
                        use crate::backend::cuda::gemm_tc::set_mn_major;
                        if dev.cc == (9, 0)
                            && std::env::var_os("TESSERA_BENCH_SKIP_WS").is_none()
                            && std::env::var_os("TESSERA_BENCH_SKIP_MN").is_none()
                        {
                            set_mn_major(Some(true));
                            let timed = fwd_and_wgrad();
                            set_mn_major(None);
                            let (b_stored, both_stored) = timed?;
                            row("matmul_mn_b", b_stored, "");
                            row("matmul_mn_ab", both_stored, "");
                        }
                    }
                    continue;
                }
                let x = Tensor::randn(&[m, k], 1.0, DType::F32, &mut rng)?;
                let y = Tensor::randn(&[k, n], 1.0, DType::F32, &mut rng)?;
                let secs = time_median(1.0, || x.matmul(&y).map(|_| ()))?;
                let gflops = 2.0 * (m * k * n) as f64 / secs / 1e9;
                if a.json {
                    println!(
                        "{{\"op\": \"matmul\", \"m\": {m}, \"k\": {k}, \"n\": {n}, \"threads\": {}, \"ms\": {:.4}, \"gflops\": {:.2}}}",
                        rayon::current_num_threads(),
                        secs * 1e3,
                        gflops
                    );
                } else {
                    println!(
                        "matmul f32 {m}x{k} @ {k}x{n}: {:.3} ms, {gflops:.1} GFLOP/s",
                        secs * 1e3
                    );
                }
            }
            Ok(())
        }
        "ops" => bench_ops(a.json),
        "cuda" => super::bench_cuda::run(a.rows, a.cols, a.json),
        "step" => bench_step(&a),
        "forward" => bench_forward(&a),
        other => Err(Error::msg(format!(
            "bench: unknown benchmark '{other}' (try: matmul, ops, step, forward, cuda)"
        ))),
    }
}

type OpFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// One fused-op case: its name, shape description and a closure computing a scalar loss
/// from the parameter-like inputs (so forward+backward can be timed too).
struct OpCase {
    name: &'static str,
    shape: &'static str,
    inputs: Vec<Tensor>,
    f: OpFn,
}

/// The shapes here are mirrored by tools/bench/cpu_vs_torch.py (keep them in step).
fn op_cases() -> Result<Vec<OpCase>> {
    use crate::ops::attention::AttentionOptions;
    let mut rng = Rng::new(0);
    let mut randn = |s: &[usize]| Tensor::randn(s, 1.0, DType::F32, &mut rng);
    let targets = Tensor::from_vec(
        (0..2048)
            .map(|i| (i * 7919 % 8192) as i64)
            .collect::<Vec<_>>(),
        &[2048],
    )?;
    Ok(vec![
        OpCase {
            name: "rms_norm",
            shape: "x [4096, 1024]",
            inputs: vec![randn(&[4096, 1024])?, randn(&[1024])?],
            f: Box::new(|v| v[0].rms_norm(&v[1], 1e-6)),
        },
        OpCase {
            name: "softmax",
            shape: "x [4096, 1024]",
            inputs: vec![randn(&[4096, 1024])?],
            f: Box::new(|v| v[0].softmax(-1)),
        },
        OpCase {
            name: "cross_entropy",
            shape: "logits [2048, 8192]",
            inputs: vec![randn(&[2048, 8192])?],
            f: Box::new(move |v| v[0].cross_entropy(&targets, -100)),
        },
        OpCase {
            name: "attention",
            shape: "q,k,v [2, 8, 512, 64] causal",
            inputs: vec![
                randn(&[2, 8, 512, 64])?,
                randn(&[2, 8, 512, 64])?,
                randn(&[2, 8, 512, 64])?,
            ],
            f: Box::new(|v| {
                Tensor::attention(
                    &v[0],
                    &v[1],
                    &v[2],
                    &AttentionOptions {
                        causal: true,
                        ..Default::default()
                    },
                )
            }),
        },
        OpCase {
            name: "swiglu",
            shape: "gate, up [4096, 2816]",
            inputs: vec![randn(&[4096, 2816])?, randn(&[4096, 2816])?],
            f: Box::new(|v| v[0].swiglu(&v[1])),
        },
    ])
}

fn bench_ops(json: bool) -> Result<()> {
    for case in op_cases()? {
        let fwd = time_median(1.0, || {
            crate::no_grad(|| (case.f)(&case.inputs)).map(|_| ())
        })?;
        let leaves: Vec<Tensor> = case.inputs.iter().map(|t| t.requires_grad_()).collect();
        // Backward from sum(y): the upstream gradient is all ones, as in the PyTorch twin.
        let both = time_median(1.0, || {
            let y = (case.f)(&leaves)?;
            let g = Tensor::ones(y.shape(), y.dtype())?;
            y.backward_with(&g)?;
            leaves.iter().for_each(|l| l.zero_grad());
            Ok(())
        })?;
        if json {
            println!(
                "{{\"op\": \"{}\", \"shape\": \"{}\", \"threads\": {}, \"fwd_ms\": {:.4}, \"fwd_bwd_ms\": {:.4}}}",
                case.name,
                case.shape,
                rayon::current_num_threads(),
                fwd * 1e3,
                both * 1e3
            );
        } else {
            println!(
                "{:<14} {:<30} forward {:>8.3} ms   forward+backward {:>8.3} ms",
                case.name,
                case.shape,
                fwd * 1e3,
                both * 1e3
            );
        }
    }
    Ok(())
}

/// A synthetic training batch for `config`: per sample one `h`x`w` image (random pixels) as
/// `<vision_start> <image_pad>×n <vision_end>` followed by random text, `seq` tokens in all.
pub fn synthetic_batch(
    config: &crate::qwen2_5_vl::Config,
    batch: usize,
    seq: usize,
    h: usize,
    w: usize,
    rng: &mut Rng,
) -> Result<crate::qwen2_5_vl::Batch> {
    let v = &config.vision;
    let f = v.patch_size * v.spatial_merge_size;
    if !h.is_multiple_of(f) || !w.is_multiple_of(f) || h == 0 || w == 0 {
        return Err(Error::msg(format!(
            "--image {h},{w}: both sides must be positive multiples of {f}"
        )));
    }
    let grid = [1, h / v.patch_size, w / v.patch_size];
    let n_img = crate::qwen2_5_vl::vision::tokens_for_grid(&grid, v);
    if seq < n_img + 3 {
        return Err(Error::msg(format!(
            "--seq {seq} is shorter than the {} tokens of one {h}x{w} image",
            n_img + 2
        )));
    }
    let vocab = config.text.vocab_size as u64;
    let special = config.vision_token_ids();
    let mut ids = Vec::with_capacity(batch * seq);
    for _ in 0..batch {
        ids.push(config.vision_start_token_id);
        ids.extend(std::iter::repeat_n(config.image_token_id, n_img));
        ids.push(config.vision_end_token_id);
        while ids.len() % seq != 0 {
            let t = rng.below(vocab) as i64;
            if !special.contains(&t) {
                ids.push(t);
            }
        }
    }
    let input_ids = Tensor::from_vec(ids.clone(), &[batch, seq])?;
    let labels: Vec<i64> = ids
        .iter()
        .map(|&t| if special.contains(&t) { -100 } else { t })
        .collect();
    let patches = batch * grid[1] * grid[2];
    Ok(crate::qwen2_5_vl::Batch {
        input_ids: Some(input_ids),
        attention_mask: None,
        pixel_values: Some(Tensor::randn(
            &[patches, v.patch_dim()],
            1.0,
            DType::F32,
            rng,
        )?),
        image_grid_thw: vec![grid; batch],
        labels: Some(Tensor::from_vec(labels, &[batch, seq])?),
    })
}

/// A training step of Qwen2.5-VL with random weights, on a synthetic batch (one image per
/// sample), as `bench step` times it; benches/cuda_kernels.rs times it too.
pub struct TrainStep {
    pub model: crate::qwen2_5_vl::QwenVl,
    batch: crate::qwen2_5_vl::Batch,
    opt: crate::optim::AdamW,
    dtype: DType,
    fused_casts: bool,
    compute_grads: bool,
}

impl TrainStep {
    /// The model of `model_dir`'s config.json (random f32 master weights on `device`), AdamW,
    /// and `batch` samples of `seq` tokens with one `image` [h, w] each; a bf16 `dtype`
    /// computes with bf16 copies of the masters.
    pub fn new(
        model_dir: &std::path::Path,
        (batch, seq, image): (usize, usize, [usize; 2]),
        device: crate::Device,
        dtype: DType,
        checkpoint: bool,
    ) -> Result<TrainStep> {
        use crate::optim::{AdamW, AdamWConfig};
        use crate::qwen2_5_vl::{Config, QwenVl};
        if device == crate::Device::Cpu && dtype != DType::F32 {
            return Err(Error::msg(format!(
                "--dtype {dtype}: the CPU backend computes in f32"
            )));
        }
        let mut config = Config::from_file(model_dir.join("config.json"))?;
        config.gradient_checkpointing = checkpoint;
        let mut rng = Rng::new(0);
        // f32 master weights on the device; a bf16 run computes with bf16 copies of them.
        let model = QwenVl::random(config.clone(), DType::F32, &mut rng)?.to_device(device)?;
        let [h, w] = image;
        let mut batch = synthetic_batch(&config, batch, seq, h, w, &mut rng)?;
        // The images on the device before the timed steps, as tools/bench/step_torch.py makes
        // PyTorch's (and a training loop's loader prefetches): 19 MB of f32 pixels at 4 × 448²,
        // which each step otherwise copied through the host's staging ring before the vision
        // tower's first product could start. The token ids stay on the host, where the rope
        // positions are computed from them.
        batch.pixel_values = batch
            .pixel_values
            .map(|p| p.to_device(device))
            .transpose()?;
        let opt = AdamW::new(model.params.tensors(), AdamWConfig::default())?;
        Ok(TrainStep {
            model,
            batch,
            opt,
            dtype,
            fused_casts: std::env::var("TESSERA_FUSED_CASTS").map_or(true, |v| v != "0"),
            compute_grads: std::env::var("TESSERA_BF16_GRADS").map_or(true, |v| v != "0"),
        })
    }

    /// Issues one step (forward, backward, AdamW); its loss, not yet read back.
    pub fn issue(&mut self) -> Result<Tensor> {
        use crate::qwen2_5_vl::QwenVl;
        let (model, opt, dtype) = (&self.model, &mut self.opt, self.dtype);
        // bf16: the model computes with AdamW's compute copies, rewritten by its fused step,
        // and leaves its gradients on them in bf16 for the step to read (`TESSERA_BF16_GRADS=0`:
        // the copies are cast nodes whose backward casts the gradients to the f32 masters;
        // `TESSERA_FUSED_CASTS=0`: a cast kernel per parameter in the graph instead).
        let params = if dtype == DType::F32 {
            model.params.clone()
        } else if self.fused_casts && self.compute_grads {
            model.params.with_tensors(opt.compute_leaves(dtype)?)?
        } else if self.fused_casts {
            model.params.with_tensors(opt.compute_params(dtype)?)?
        } else {
            model.params.cast(dtype)?
        };
        let compute = QwenVl {
            config: model.config.clone(),
            params,
        };
        let loss = compute
            .forward(&self.batch)?
            .loss
            .ok_or_else(|| Error::msg("no loss"))?;
        loss.backward()?;
        opt.step(1e-4)?;
        opt.zero_grad();
        Ok(loss)
    }
}

/// One full training step (forward, backward, AdamW) of Qwen2.5-VL with random weights.
fn bench_step(a: &BenchArgs) -> Result<()> {
    let device: crate::Device = a.device.parse()?;
    let dtype: DType = a.dtype.parse()?;
    let [h, w] = a.image[..] else {
        return Err(Error::msg("--image wants H,W"));
    };
    let mut train = TrainStep::new(
        &a.model,
        (a.batch, a.seq, [h, w]),
        device,
        dtype,
        a.checkpoint,
    )?;
    let mut last_loss = f64::NAN;
    // CUDA: where the host's time goes (launches, synchronisations and the time blocked in
    // them, and the time to issue the step's work before the final read of the loss).
    let cuda = device == crate::Device::Cuda;
    let host = || cuda.then(crate::backend::cuda::host_stats);
    // Per step: (ms to issue the step, ms of it blocked in synchronisations).
    let mut issue_ms = Vec::new();
    // A step from an idle device to its loss on the host (the measured step, as
    // tools/bench/step_torch.py times PyTorch's).
    let mut step = |train: &mut TrainStep| -> Result<f64> {
        let t = Instant::now();
        let h_start = host();
        let loss = train.issue()?;
        let (blocked, launching) = match (h_start, host()) {
            (Some(a), Some(b)) => (b.sync_ms - a.sync_ms, b.launch_ms - a.launch_ms),
            _ => (0.0, 0.0),
        };
        issue_ms.push((t.elapsed().as_secs_f64() * 1e3, blocked, launching));
        last_loss = loss.to_scalar()?;
        Ok(t.elapsed().as_secs_f64())
    };
    step(&mut train)?; // warm-up
    let host0 = host();
    if device == crate::Device::Cuda {
        crate::backend::cuda::profile_report()?; // drop the warm-up's kernels
    }
    let mut times: Vec<f64> = (0..a.steps.max(1))
        .map(|_| step(&mut train))
        .collect::<Result<_>>()?;
    if let (Some(h0), Some(h1)) = (host0, host()) {
        let steps = times.len() as f64;
        let issue: f64 = issue_ms[1..].iter().map(|x| x.0).sum::<f64>() / steps;
        let blocked: f64 = issue_ms[1..].iter().map(|x| x.1).sum::<f64>() / steps;
        let launching: f64 = issue_ms[1..].iter().map(|x| x.2).sum::<f64>() / steps;
        eprintln!(
            "host per step: {:.0} launches, {:.0} synchronisations; the step's work was issued \
             after {issue:.1} ms: {blocked:.1} ms blocked in synchronisations, {launching:.1} ms \
             in launch calls (waiting there when the launch queue is full) and {:.1} ms the \
             host's own work, of a {:.1} ms step",
            (h1.launches - h0.launches) as f64 / steps,
            (h1.syncs - h0.syncs) as f64 / steps,
            issue - blocked - launching,
            times.iter().sum::<f64>() * 1e3 / steps
        );
    }
    if device == crate::Device::Cuda && crate::backend::cuda::profiling() {
        // Kernel time per step, by kernel (TESSERA_PROFILE=1), against the measured step.
        let crate::backend::cuda::Timeline {
            kernels: tagged,
            gaps,
            noted,
        } = crate::backend::cuda::profile_timeline()?;
        let steps = times.len() as f64;
        // Kernel names carry the part of the model that launched them ("... [text mlp,
        // backward]", `autograd::part`): by kernel alone first, then by part.
        let sum_by = |key: &dyn Fn(&str) -> String| {
            let mut m: std::collections::HashMap<String, (usize, f64)> = Default::default();
            for (name, n, ms) in &tagged {
                let e = m.entry(key(name)).or_default();
                e.0 += n;
                e.1 += ms;
            }
            let mut v: Vec<(String, usize, f64)> =
                m.into_iter().map(|(k, (n, ms))| (k, n, ms)).collect();
            v.sort_by(|a, b| b.2.total_cmp(&a.2));
            v
        };
        let report = sum_by(&|name: &str| name.split(" [").next().unwrap_or(name).to_string());
        let parts = sum_by(&|name: &str| {
            name.split_once(" [")
                .map_or("(no part)".to_string(), |(_, p)| {
                    p.trim_end_matches(']').to_string()
                })
        });
        let total: f64 = report.iter().map(|r| r.2).sum::<f64>() / steps;
        let wall = times.iter().sum::<f64>() * 1e3 / steps;
        eprintln!("kernel time {total:.1} ms of {wall:.1} ms per step (the rest: host work and synchronisation)");
        eprintln!(
            "{:<36} {:>9} {:>10} {:>6}",
            "kernel", "launches", "ms/step", "share"
        );
        // Every kernel down to 0.02 ms a step, then the rest in one line.
        let (shown, rest): (Vec<_>, Vec<_>) = report.iter().partition(|r| r.2 / steps >= 0.02);
        for (name, n, ms) in shown {
            eprintln!(
                "{name:<36} {:>9} {:>10.2} {:>5.1}%",
                (*n as f64 / steps).round(),
                ms / steps,
                100.0 * ms / steps / wall
            );
        }
        if !rest.is_empty() {
            let (n, ms) = rest.iter().fold((0, 0.0), |a, r| (a.0 + r.1, a.1 + r.2));
            eprintln!(
                "{:<36} {:>9} {:>10.2} {:>5.1}%",
                format!("({} other kernels)", rest.len()),
                (n as f64 / steps).round(),
                ms / steps,
                100.0 * ms / steps / wall
            );
        }
        eprintln!("kernel time by part of the model (autograd::part; a backward's kernels count to the part that recorded the op):");
        eprintln!(
            "{:<44} {:>9} {:>10} {:>6}",
            "part", "launches", "ms/step", "share"
        );
        for (part, n, ms) in &parts {
            eprintln!(
                "{part:<44} {:>9} {:>10.2} {:>5.1}%",
                (*n as f64 / steps).round(),
                ms / steps,
                100.0 * ms / steps / wall
            );
        }
        // The products by shape (their launchers' `profile_note`): where the GEMM time goes,
        // and at what rate, in the step itself.
        eprintln!("the products by shape, largest first (m x k x n; TFLOP/s of their own time):");
        for (name, shape, n, ms, flops) in noted.iter() {
            eprintln!(
                "{name:<72} {shape:>22} {:>4} {:>8.3} {:>7.1}",
                (*n as f64 / steps).round(),
                ms / steps,
                flops / (ms * 1e-3) / 1e12
            );
        }
        eprintln!("the 25 largest kernels by part:");
        for (name, n, ms) in tagged.iter().take(25) {
            eprintln!(
                "{name:<72} {:>6} {:>8.2}",
                (*n as f64 / steps).round(),
                ms / steps
            );
        }
        // Where the device was outside kernels (waiting for the host, or in memsets and
        // copies), by the kernel that came next; the first kernel of a step carries the time
        // since the last one of the step before (the host's start of a step and the loss read).
        let idle: f64 = gaps.iter().map(|g| g.2).sum::<f64>() / steps;
        eprintln!("outside kernels {idle:.1} ms per step, before:");
        eprintln!("{:<36} {:>9} {:>10}", "kernel", "gaps", "ms/step");
        for (name, n, ms) in gaps.iter().take(15) {
            eprintln!(
                "{name:<36} {:>9} {:>10.2}",
                (*n as f64 / steps).round(),
                ms / steps
            );
        }
    }
    // CUDA: the same number of steps issued back to back, each loss read only after the last
    // step is issued (a training loop that logs its losses late): the host prepares a step
    // while the device still runs the one before, so the device idles neither at a step's
    // start nor on its final read. Wall time per step.
    let pipelined_ms = if cuda && !crate::backend::cuda::profiling() {
        crate::backend::cuda::device()?.synchronize()?;
        let t = Instant::now();
        let losses: Vec<Tensor> = (0..times.len())
            .map(|_| train.issue())
            .collect::<Result<_>>()?;
        for l in &losses {
            last_loss = l.to_scalar()?;
        }
        Some(t.elapsed().as_secs_f64() * 1e3 / times.len() as f64)
    } else {
        None
    };
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (a.batch * a.seq) as f64 / median;
    if a.json {
        // Which kernel ran the CUDA products (`--gemm`): the rows are then self-describing.
        let gemm = match crate::backend::cuda::gemm_tc::gemm_choice() {
            _ if !cuda => "null".to_string(),
            "" => "\"default\"".to_string(),
            g => format!("\"{g}\""),
        };
        let peak = if device == crate::Device::Cuda {
            crate::backend::cuda::device()?.mem_stats().peak as f64 / (1u64 << 30) as f64
        } else {
            peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
        };
        println!(
            "{{\"device\": \"{device}\", \"dtype\": \"{dtype}\", \"batch\": {}, \"seq\": {}, \"step_ms_median\": {:.3}, \"tokens_per_s\": {:.1}, \"pipelined_ms\": {}, \"threads\": {}, \"params\": {}, \"loss\": {}, \"peak_gib\": {peak:.2}, \"gemm\": {gemm}}}",
            a.batch,
            a.seq,
            median * 1e3,
            tokens,
            pipelined_ms.map_or("null".to_string(), |ms| format!("{ms:.3}")),
            rayon::current_num_threads(),
            train.model.params.numel(),
            // JSON has no inf or NaN: a diverged loss is null.
            if last_loss.is_finite() {
                format!("{last_loss:.4}")
            } else {
                "null".to_string()
            }
        );
    } else {
        println!(
            "train step {}: batch {} x seq {} + one {h}x{w} image each: {:.1} ms median of {} ({tokens:.0} tokens/s, {} threads)",
            a.model.display(),
            a.batch,
            a.seq,
            median * 1e3,
            times.len(),
            rayon::current_num_threads()
        );
        if let Some(ms) = pipelined_ms {
            println!(
                "  pipelined (steps issued back to back, losses read after the last): {ms:.1} ms a step ({:.0} tokens/s)",
                (a.batch * a.seq) as f64 / ms * 1e3
            );
        }
    }
    Ok(())
}

/// Peak resident memory of this process (VmHWM), in bytes, where /proc exists.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// One no-grad forward of the model in `--model` (its weights when the directory has them,
/// else random), batch × seq tokens with one image each: load time, forward time, peak memory.
fn bench_forward(a: &BenchArgs) -> Result<()> {
    use crate::qwen2_5_vl::{Config, QwenVl};
    let [h, w] = a.image[..] else {
        return Err(Error::msg("--image wants H,W"));
    };
    let t0 = Instant::now();
    let has_weights = a.model.join("model.safetensors").exists()
        || a.model.join("model.safetensors.index.json").exists();
    let mut rng = Rng::new(0);
    let model = if has_weights {
        QwenVl::load(&a.model, DType::F32)?
    } else {
        QwenVl::random(
            Config::from_file(a.model.join("config.json"))?,
            DType::F32,
            &mut rng,
        )?
    };
    let load_s = t0.elapsed().as_secs_f64();
    let batch = synthetic_batch(&model.config, a.batch, a.seq, h, w, &mut rng)?;
    let t1 = Instant::now();
    let out = crate::no_grad(|| model.forward(&batch))?;
    let fwd_s = t1.elapsed().as_secs_f64();
    let loss = out
        .loss
        .map(|l| l.to_scalar())
        .transpose()?
        .unwrap_or(f64::NAN);
    let peak = peak_rss_bytes()
        .map(|b| b as f64 / (1u64 << 30) as f64)
        .unwrap_or(f64::NAN);
    println!(
        "{{\"model\": \"{}\", \"params\": {}, \"weights\": \"{}\", \"load_s\": {load_s:.2}, \"forward_s\": {fwd_s:.3}, \"tokens\": {}, \"loss\": {loss:.4}, \"peak_rss_gib\": {peak:.2}, \"threads\": {}}}",
        a.model.display(),
        model.params.numel(),
        if has_weights { "loaded" } else { "random" },
        a.batch * a.seq,
        rayon::current_num_threads()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_matrices_repeat_one_random_block_down_their_rows() -> Result<()> {
        let mut rng = Rng::new(0);
        // 7 rows of 5 in blocks of 2 rows (at most 12 entries): rows 0-1 repeat at 2-3, 4-5, 6.
        let m = bench_matrix(7, 5, 12, DType::F32, crate::Device::Cpu, &mut rng)?;
        assert_eq!(m.shape(), &[7, 5]);
        let v = m.to_vec::<f32>()?;
        assert!(v[..10].iter().all(|x| x.is_finite() && *x != 0.0));
        for r in 2..7 {
            assert_eq!(v[r * 5..r * 5 + 5], v[(r % 2) * 5..(r % 2) * 5 + 5]);
        }
        // Small enough: one fresh block.
        let m = bench_matrix(3, 4, 12, DType::BF16, crate::Device::Cpu, &mut rng)?;
        assert_eq!((m.shape(), m.dtype()), (&[3, 4][..], DType::BF16));
        Ok(())
    }
}
