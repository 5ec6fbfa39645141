//! The `tessera` command line.

pub mod bench;
mod bench_cuda;
mod demo;
mod dynamics;
pub mod forward;
mod generate;
mod init;
mod policy_loss;
mod preprocess;
mod study;
mod tokenize;
mod train;

use crate::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "A from-scratch deep-learning framework: autograd, CPU backend, Qwen2.5-VL training"
)]
struct Cli {
    /// Worker threads (default: all cores; or RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// The kernel for CUDA matrix products: the hand-written GEMM (default), cuBLAS (the
    /// benchmark reference: `bench matmul` and `bench step` then time it), or for measurements
    /// the older mma / wgmma kernels and the SIMT one. Same as TESSERA_GEMM.
    #[arg(long, global = true, value_parser = clap::builder::PossibleValuesParser::new(crate::backend::cuda::gemm_tc::GEMM_CHOICES))]
    gemm: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a small transformer from scratch on a synthetic task (sorting digits) and
    /// print its loss and accuracy as it learns.
    Demo(demo::DemoArgs),
    /// Qwen2.5-VL forward (and backward with --grad) on tensors from a safetensors file.
    Forward(forward::ForwardArgs),
    /// Image to pixel_values and image_grid_thw (Qwen2.5-VL preprocessing).
    Preprocess(preprocess::PreprocessArgs),
    /// Token ids of a text (JSON), optionally through the chat template with images.
    Tokenize(tokenize::TokenizeArgs),
    /// Write a model directory with random weights for a config.json.
    Init(init::InitArgs),
    /// GRPO-family policy loss and d loss / d logps on tensors from a safetensors file.
    PolicyLoss(policy_loss::PolicyLossArgs),
    /// The paper's experiment end to end: base, SFT / GRPO / SFT-on-rollouts arms on the
    /// jigsaw, prior-knowledge forgetting, learning dynamics; writes runs/NAME/report.md.
    Study(study::StudyArgs),
    /// Generate text from a Qwen2.5-VL model directory (KV cache; greedy or sampled).
    Generate(generate::GenerateArgs),
    /// Train with SFT or GRPO from a TOML config (checkpoints, resume, metrics.jsonl).
    Train(train::TrainArgs),
    /// Learning dynamics: per-sample gradient influence of training samples on probes.
    Dynamics(dynamics::DynamicsArgs),
    /// Benchmarks: matrix products, the fused ops, a training step, a forward, on the CPU or
    /// with --device cuda (and `bench cuda`: the memory-bound kernels against a device copy);
    /// tools/bench/*.py and tools/gpu/ put them beside PyTorch on the same machine.
    Bench(bench::BenchArgs),
}

pub fn run() -> Result<()> {
    crate::backend::cpu::keep_freed_memory();
    let cli = Cli::parse();
    if let Some(g) = &cli.gemm {
        crate::backend::cuda::gemm_tc::set_gemm_choice(Some(g))?;
    }
    // The command runs on a worker of its own pool (`install`), not beside it: with the
    // command on the main thread, the pool's idle workers spun (sched_yield) against its
    // serial work, three threads on two cores; a pretraining step of the tiny preset took
    // 96 ms, 81 ms inside the pool (docs/performance.md). Same results: the kernels split
    // work by rows and threads, never by timing. Parallel closures work on raw slices and
    // must not record graph ops: `no_grad` is per thread, and any worker may run them.
    // Workers get at least the main thread's 8 MiB of stack, where the command used to run
    // (dropping a deep graph that was never run backwards recurses through its nodes).
    let mut pool = rayon::ThreadPoolBuilder::new().stack_size(16 << 20);
    if let Some(n) = cli.threads {
        pool = pool.num_threads(n);
    }
    let pool = pool
        .build()
        .map_err(|e| crate::Error::msg(format!("thread pool ({:?} threads): {e}", cli.threads)))?;
    pool.install(move || dispatch(cli.command))
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Init(a) => init::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Preprocess(a) => preprocess::run(a),
        Command::PolicyLoss(a) => policy_loss::run(a),
        Command::Study(a) => study::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Train(a) => train::run(a),
        Command::Dynamics(a) => dynamics::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::{CommandFactory, Parser};

    /// clap's own checks of every command's arguments (a global flag such as `--gemm` clashing
    /// with a subcommand's would only panic when that subcommand is parsed), and `--gemm`
    /// taken by any command.
    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["tessera", "bench", "matmul", "--gemm", "cublas"]).unwrap();
        assert_eq!(cli.gemm.as_deref(), Some("cublas"));
        assert!(Cli::try_parse_from(["tessera", "--gemm", "cuBLAS", "demo"]).is_err());
    }
}
