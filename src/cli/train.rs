//! `tessera train sft|grpo --config FILE [--set section.key=value]... [--resume]`

use crate::rl::config::TrainConfig;
use crate::rl::sources;
use crate::rl::trainer::{Kind, Trainer};
use crate::Result;
use clap::ValueEnum;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
pub enum Algorithm {
    /// Supervised fine-tuning on the answers (cross-entropy on the assistant turn only).
    Sft,
    /// Group-relative policy optimisation with the task's reward.
    Grpo,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    algorithm: Algorithm,
    /// Run configuration (TOML; every key has a default, see src/rl/config.rs).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set optim.lr=1e-4 --set grpo.group_size=4.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Shorthand for --set train.steps=N.
    #[arg(long)]
    steps: Option<u64>,
    /// Shorthand for --set out=DIR.
    #[arg(long)]
    out: Option<String>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    resume: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut set = args.set.clone();
    if let Some(s) = args.steps {
        set.push(format!("train.steps={s}"));
    }
    if let Some(o) = &args.out {
        set.push(format!("out=\"{o}\""));
    }
    let cfg = TrainConfig::load(args.config.as_deref(), &set)?;
    let kind = match args.algorithm {
        Algorithm::Sft => Kind::Sft,
        Algorithm::Grpo => Kind::Grpo,
    };
    let task = sources::open(&cfg.data.train, &cfg)?;
    let evals = cfg
        .data
        .eval
        .iter()
        .map(|s| sources::open(s, &cfg))
        .collect::<Result<Vec<_>>>()?;
    let mut trainer = Trainer::new(kind, cfg, task, evals, args.resume)?;
    let last = trainer.train()?;
    eprintln!("{}", crate::rl::trainer::summary(&last));
    eprintln!(
        "run: {} (metrics.jsonl, checkpoints/)",
        trainer.run_dir().display()
    );
    Ok(())
}
