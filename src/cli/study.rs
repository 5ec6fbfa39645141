//! `tessera study [--preset smoke|tiny] [--name NAME] [--model DIR --prior FILE.jsonl --images DIR]
//! [--device cpu|cuda] [--dtype f32|bf16]`

use crate::study::{Inputs, Preset, Study};
use crate::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct StudyArgs {
    /// smoke (minutes; checks the pipeline) or tiny (the embedded study, under an hour on 2 cores).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Run name: the study writes runs/NAME/ (default: the preset's name).
    #[arg(long)]
    name: Option<String>,
    /// Parent folder of the run.
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
    /// Start from this checkpoint instead of pretraining the tiny preset (needs --prior).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prior-knowledge suites as JSONL files (image, question, answer, scorer); repeatable.
    #[arg(long)]
    prior: Vec<PathBuf>,
    /// Jigsaw puzzles from this folder of images instead of synthetic ones.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Jigsaw grid RxC (default 2x2 for the tiny preset, 3x3 with --model).
    #[arg(long)]
    grid: Option<String>,
    /// Seed of the base initialisation and the data order.
    #[arg(long)]
    seed: Option<u64>,
    /// The tiny preset's model directory (config.json + tokenizer.json); when it is absent, the
    /// copy compiled into tessera is used.
    #[arg(long, default_value = "models/tiny")]
    tiny_dir: PathBuf,
    /// Where the stages train and the evaluations run: cpu or cuda (every stage's
    /// `model.device`).
    #[arg(long, default_value = "cpu")]
    device: crate::Device,
    /// f32, or bf16 with --device cuda: the stages and the final evaluations compute with bf16
    /// copies of the f32 weights (`model.dtype`).
    #[arg(long, default_value = "f32")]
    dtype: crate::DType,
}

pub fn run(args: StudyArgs) -> Result<()> {
    let mut preset = Preset::by_name(&args.preset)?;
    if let Some(s) = args.seed {
        preset.seed = s;
    }
    let grid = args
        .grid
        .clone()
        .or_else(|| args.model.as_ref().map(|_| "3x3".to_string()));
    if let Some(g) = grid {
        let bad = || crate::Error::msg(format!("--grid {g}: want RxC, e.g. 3x3"));
        let (r, c) = g.split_once('x').ok_or_else(bad)?;
        preset.grid = (r.parse().map_err(|_| bad())?, c.parse().map_err(|_| bad())?);
    }
    let name = args.name.clone().unwrap_or_else(|| preset.name.clone());
    let mut tiny_dir = args.tiny_dir;
    if args.model.is_none() && !tiny_dir.join("config.json").exists() {
        // Outside the source tree: the preset is compiled in; write it beside the run.
        tiny_dir = args.runs.join(&name).join("tiny-preset");
        std::fs::create_dir_all(&tiny_dir)
            .map_err(|e| crate::Error::file(&tiny_dir, format!("cannot create: {e}")))?;
        for (file, text) in [
            ("config.json", crate::tasks::vocab::TINY_CONFIG_JSON),
            ("tokenizer.json", crate::tasks::vocab::TINY_TOKENIZER_JSON),
        ] {
            let p = tiny_dir.join(file);
            std::fs::write(&p, text)
                .map_err(|e| crate::Error::file(&p, format!("cannot write: {e}")))?;
        }
    }
    let inputs = Inputs {
        model: args.model,
        prior: args.prior,
        images: args.images,
        tiny_dir,
        device: args.device,
        dtype: args.dtype,
    };
    let study = Study::new(preset, inputs, args.runs.join(&name))?;
    study.run()?;
    println!("{}", study.dir.join("report.md").display());
    Ok(())
}
