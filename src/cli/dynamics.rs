//! `tessera dynamics`: influence of training samples on probes (one SGD step, predicted by
//! gradient inner products and optionally measured), written as influence.csv, summary.md
//! and influence.png. Formulas: docs/dynamics.md.

use crate::dynamics::report::write_report;
use crate::dynamics::{influence, InfluenceOptions, Objective, ParamSelector, SampleSource};
use crate::qwen2_5_vl::tokenizer::QwenTokenizer;
use crate::qwen2_5_vl::QwenVl;
use crate::rl::data::{Encoded, Encoder, Example};
use crate::tasks::dataset::{load_jsonl, Record};
use crate::{DType, Device, Error, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct DynamicsArgs {
    /// Model directory: config.json + model.safetensors (or a sharded index).
    #[arg(long)]
    model: PathBuf,
    /// Training samples x_u: JSONL, one {"image": path|null, "question", "answer"} per line.
    #[arg(long)]
    train: PathBuf,
    /// Probe samples x_v, same format; streamed one at a time.
    #[arg(long)]
    probe: PathBuf,
    /// η of the one SGD step.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Parameters to differentiate and step: comma-separated globs over the official names
    /// (`*` matches anything), e.g. 'model.layers.*.mlp.*,lm_head.weight'.
    #[arg(long, default_value = "*")]
    params: String,
    /// tokenizer.json (default: MODEL/tokenizer.json).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Also take each step for real and measure the probes' change (N_train × N_probe
    /// forwards).
    #[arg(long)]
    actual: bool,
    /// The training step: logprob (θ += η ∇ log π) or sft (θ -= η ∇ mean token NLL).
    #[arg(long, default_value = "logprob")]
    step: String,
    /// Use the first N training samples only.
    #[arg(long)]
    max_train: Option<usize>,
    /// Use the first N probes only.
    #[arg(long)]
    max_probe: Option<usize>,
    /// Output directory: influence.csv, summary.md, influence.png.
    #[arg(long)]
    out: PathBuf,
    /// Parameter dtype: f32, or f64 on the CPU (exact enough to measure tiny steps).
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// JSONL records turned into model samples on demand (each image read when its sample is).
struct JsonlSource<'a> {
    file: PathBuf,
    records: Vec<Record>,
    encoder: &'a Encoder,
}

impl<'a> JsonlSource<'a> {
    fn open(file: &Path, max: Option<usize>, encoder: &'a Encoder) -> Result<JsonlSource<'a>> {
        let mut records = load_jsonl(file)?;
        if let Some(n) = max {
            records.truncate(n);
        }
        if records.is_empty() {
            return Err(Error::file(file, "no records"));
        }
        Ok(JsonlSource {
            file: file.to_path_buf(),
            records,
            encoder,
        })
    }
}

impl SampleSource for JsonlSource<'_> {
    fn len(&self) -> usize {
        self.records.len()
    }
    fn sample(&self, i: usize) -> Result<Encoded> {
        let r = self
            .records
            .get(i)
            .ok_or_else(|| Error::file(&self.file, format!("record {i} out of range")))?;
        let example = Example {
            image: r.load_image()?,
            question: r.question.clone(),
            answer: r.answer.clone(),
        };
        self.encoder
            .example(&example)
            .map_err(|e| Error::msg(format!("{}: {e}", self.label(i))))
    }
    fn label(&self, i: usize) -> String {
        format!("{} record {}", self.file.display(), i + 1)
    }
}

pub fn run(a: DynamicsArgs) -> Result<()> {
    let device: Device = a.device.parse()?;
    let dtype: DType = a.dtype.parse()?;
    match (device, dtype) {
        (Device::Cpu, DType::F32 | DType::F64) | (Device::Cuda, DType::F32) => {}
        _ => {
            return Err(Error::msg(format!(
                "--dtype {dtype} on {}: want f32 or f64 on cpu, f32 on cuda",
                a.device
            )))
        }
    }
    let step: Objective = a.step.parse()?;
    let selector = ParamSelector::parse(&a.params)?;
    let model = QwenVl::load(&a.model, dtype)?.to_device(device)?;
    let tokenizer_path = a
        .tokenizer
        .clone()
        .unwrap_or_else(|| a.model.join("tokenizer.json"));
    let encoder = Encoder::new(QwenTokenizer::from_file(&tokenizer_path)?, &model.config);
    let train = JsonlSource::open(&a.train, a.max_train, &encoder)?;
    let probes = JsonlSource::open(&a.probe, a.max_probe, &encoder)?;

    let selected = selector.resolve(&model.params)?;
    eprintln!(
        "dynamics: {} train x {} probes, {} tensors ({} elements) selected; holding {} train \
         gradients = {:.1} MB",
        train.len(),
        probes.len(),
        selected.tensors.len(),
        selected.numel,
        train.len(),
        (train.len() * selected.numel * 8) as f64 / 1e6
    );
    let opts = InfluenceOptions {
        lr: a.lr,
        selector,
        step,
        actual: a.actual,
        progress: true,
    };
    let report = influence(&model, &train, &probes, &opts)?;

    let command: Vec<String> = std::env::args().collect();
    let setup = vec![
        ("model".to_string(), a.model.display().to_string()),
        ("train".to_string(), a.train.display().to_string()),
        ("probes".to_string(), a.probe.display().to_string()),
        ("parameters".to_string(), format!("`{}`", a.params)),
        (
            "dtype, device".to_string(),
            format!("{dtype}, {}", a.device),
        ),
        (
            "threads".to_string(),
            rayon::current_num_threads().to_string(),
        ),
        ("command".to_string(), format!("`{}`", command.join(" "))),
    ];
    write_report(&a.out, &report, &setup)?;
    let mut line = format!(
        "dynamics: {} pairs, predicted {:.3e} s per pair",
        report.pairs(),
        report.predicted_s_per_pair()
    );
    if let Some(r) = report.correlation() {
        line += &format!(
            ", measured {:.3e} s per pair, Pearson r {r:.4}",
            report.actual_s_per_pair()
        );
    }
    eprintln!("{line}; wrote {}", a.out.display());
    Ok(())
}
