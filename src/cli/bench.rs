//! `tessera bench`: CPU kernel timings in a machine-readable form.

use crate::{DType, Error, Result, Rng, Tensor};
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to time: matmul (GFLOP/s of square and LLM-shaped f32 products) or step
    /// (one training step of the demo model).
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
        other => Err(Error::msg(format!(
            "bench: unknown benchmark '{other}' (try: matmul)"
        ))),
    }
}
