//! `tessera bench`: CPU kernel timings in a machine-readable form.

use crate::{DType, Error, Result, Rng, Tensor};
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to time: matmul (GFLOP/s of square and LLM-shaped f32 products) or ops (the
    /// fused model ops, forward and forward+backward, at fixed shapes).
    #[arg(default_value = "matmul")]
    what: String,
    /// Matrix sizes for matmul, as MxKxN or a single N for square.
    #[arg(long, value_delimiter = ',', default_values_t = ["512".to_string(), "1024".to_string(), "2048".to_string(), "4096x2048x256".to_string()])]
    sizes: Vec<String>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
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
            for s in &a.sizes {
                let (m, k, n) = parse_size(s)?;
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
        other => Err(Error::msg(format!(
            "bench: unknown benchmark '{other}' (try: matmul, ops)"
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
