//! The study's report: `report.md`, `metrics.jsonl` (every stage, tagged with its arm) and the
//! curves as PNG.

use super::plot::{line_chart, Series};
use super::{Arm, Study};
use crate::dynamics::influence::arm_summary;
use crate::dynamics::select::ParamSelector;
use crate::qwen2_5_vl::model::QwenVl;
use crate::qwen2_5_vl::tokenizer::QwenTokenizer;
use crate::rl::data::{Encoded, Encoder};
use crate::rl::sources;
use crate::rl::task::Split;
use crate::{DType, Error, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

fn read_metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The name a task spec evaluates under (`eval/<name>`).
fn task_name(spec: &str) -> Result<String> {
    let cfg = crate::rl::config::TrainConfig::default();
    Ok(sources::open(spec, &cfg)?.name())
}

fn score(arm: &Arm, task: &str) -> Option<f64> {
    arm.scores
        .get(&format!("eval/{task}"))
        .and_then(|v| v.as_f64())
}

fn fmt_change(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) => format!("{:.2} ({:+.2})", v, v - b),
        (Some(v), None) => format!("{v:.2}"),
        _ => "–".into(),
    }
}

/// Mean change of the prior suites against the base (None for a skipped arm).
pub fn mean_prior_change(arm: &Arm, base: &Arm, priors: &[String]) -> Option<f64> {
    if arm.skipped.is_some() || priors.is_empty() {
        return None;
    }
    let d: Vec<f64> = priors
        .iter()
        .filter_map(|p| Some(score(arm, p)? - score(base, p)?))
        .collect();
    (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
}

/// Learning dynamics of the two training sets (jigsaw answers for SFT; correct GRPO rollouts
/// for GRPO and SFT-on-rollouts) against prior-knowledge probes, measured on the base model.
pub fn dynamics_section(study: &Study, base_dir: &Path, rollouts: &Path) -> Result<String> {
    let n = study.preset.dynamics_samples;
    let model = QwenVl::load(base_dir, DType::F32)?.to_device(study.inputs.device)?;
    let tokenizer = QwenTokenizer::from_file(&base_dir.join("tokenizer.json"))?;
    let enc = Encoder::new(tokenizer, &model.config);
    let cfg = crate::rl::config::TrainConfig::default();
    let examples = |spec: &str, split: Split, n: usize| -> Result<Vec<Encoded>> {
        let t = sources::open(spec, &cfg)?;
        (0..n as u64)
            .map(|i| enc.example(&t.example(split, i)?))
            .collect()
    };
    // Probes: eval examples spread over the prior suites.
    let priors = study.prior_specs();
    let mut probes = Vec::new();
    for (k, spec) in priors.iter().enumerate() {
        let per = n / priors.len() + usize::from(k < n % priors.len());
        probes.extend(examples(spec, Split::Eval, per)?);
    }
    let sft_data = examples(study.jigsaw_spec(), Split::Train, n)?;
    let has_rollouts = std::fs::read_to_string(rollouts).is_ok_and(|t| !t.trim().is_empty());
    let rollout_data = if has_rollouts {
        let spec = rollouts.display().to_string();
        let t = sources::open(&spec, &cfg)?;
        let len = t.len(Split::Train).unwrap_or(0).min(n);
        (0..len as u64)
            .map(|i| enc.example(&t.example(Split::Train, i)?))
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let lr = 1e-4;
    let sel = ParamSelector::all();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Measured on the base model, all parameters, η = {lr}: for each training set, the \
         perplexity of its answers under the base (the paper's alignment proxy), and the \
         first-order change of the prior probes' log-probability for one SGD step on a \
         training sample, Δ log π(x_v) ≈ η ⟨∇ log π(x_v), ∇ log π(x_u)⟩, averaged over \
         {} probes from the prior suites × the training samples; LBK is the paper's magnitude \
         estimate (docs/dynamics.md).\n",
        probes.len()
    );
    let _ = writeln!(
        out,
        "| training data (arms) | samples | perplexity under base | mean Δ log π(prior) | mean abs Δ | mean cosine | LBK |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for (label, data) in [
        ("jigsaw answers (SFT)", &sft_data),
        (
            "correct GRPO rollouts (GRPO, SFT on rollouts)",
            &rollout_data,
        ),
    ] {
        if data.is_empty() || probes.is_empty() {
            let _ = writeln!(out, "| {label} | 0 | – | – | – | – | – |");
            continue;
        }
        let d = arm_summary(&model, data, &probes, lr, &sel)?;
        let _ = writeln!(
            out,
            "| {label} | {} | {:.3} | {:+.3e} | {:.3e} | {:+.3} | {:.3e} |",
            data.len(),
            d.train_perplexity,
            d.mean_influence,
            d.mean_abs_influence,
            d.mean_cosine,
            d.lbk
        );
    }
    Ok(out)
}

fn curves(study: &Study, arms: &[Arm], priors: &[String]) -> Result<Vec<(String, String)>> {
    let jig = study.jigsaw_name();
    let trained: Vec<&Arm> = arms
        .iter()
        .filter(|a| a.skipped.is_none() && a.name != "base")
        .collect();
    let series = |key: &dyn Fn(&Value) -> Option<f64>| -> Vec<Series> {
        trained
            .iter()
            .map(|a| Series {
                name: a.name.clone(),
                points: read_metrics(&a.run)
                    .iter()
                    .filter_map(|m| Some((m.get("step")?.as_f64()?, key(m)?)))
                    .collect(),
            })
            .collect()
    };
    let mut files = Vec::new();
    let jkey = format!("eval/{jig}");
    let s = series(&|m: &Value| m.get(&jkey)?.as_f64());
    line_chart(
        &study.dir.join("jigsaw.png"),
        &format!("{jig} accuracy"),
        &s,
        Some((0.0, 1.0)),
    )?;
    files.push(("jigsaw.png".to_string(), format!("{jig} accuracy by step")));
    let pkeys: Vec<String> = priors.iter().map(|p| format!("eval/{p}")).collect();
    let s = series(&|m: &Value| {
        let v: Vec<f64> = pkeys.iter().filter_map(|k| m.get(k)?.as_f64()).collect();
        (v.len() == pkeys.len() && !v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    });
    line_chart(
        &study.dir.join("prior.png"),
        "mean prior accuracy",
        &s,
        Some((0.0, 1.0)),
    )?;
    files.push((
        "prior.png".to_string(),
        "mean accuracy over the prior suites by step".to_string(),
    ));
    for a in &trained {
        let ms = read_metrics(&a.run);
        let s: Vec<Series> = priors
            .iter()
            .map(|p| Series {
                name: p.clone(),
                points: ms
                    .iter()
                    .filter_map(|m| {
                        Some((
                            m.get("step")?.as_f64()?,
                            m.get(format!("eval/{p}"))?.as_f64()?,
                        ))
                    })
                    .collect(),
            })
            .collect();
        let f = format!("prior-{}.png", a.name);
        line_chart(
            &study.dir.join(&f),
            &format!("{} prior suites", a.name),
            &s,
            Some((0.0, 1.0)),
        )?;
        files.push((f, format!("every prior suite during {}", a.label)));
    }
    Ok(files)
}

/// Writes report.md, metrics.jsonl and the PNG curves into the study directory.
pub fn write(study: &Study, arms: &[Arm], dynamics: Option<&str>) -> Result<()> {
    let dir = &study.dir;
    let jig = study.jigsaw_name();
    let priors: Vec<String> = study
        .prior_specs()
        .iter()
        .map(|s| task_name(s))
        .collect::<Result<_>>()?;
    let base = &arms[0];

    // metrics.jsonl: every stage's lines, tagged.
    let mut all = String::new();
    for a in arms {
        for mut m in read_metrics(&a.run) {
            if let Value::Object(o) = &mut m {
                o.insert("arm".into(), Value::String(a.name.clone()));
            }
            all.push_str(&m.to_string());
            all.push('\n');
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), all)
        .map_err(|e| Error::file(dir.join("metrics.jsonl"), format!("cannot write: {e}")))?;

    let p = &study.preset;
    let mut r = String::new();
    let _ = writeln!(
        r,
        "# Study report: {}\n",
        dir.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    );
    let _ = writeln!(r, "## Setup\n");
    let _ = writeln!(
        r,
        "- base: {}\n- novel task: {} ({}x{} jigsaw; reward hit + accuracy + format)\n- prior suites: {}\n- preset `{}`: batch {}, pretrain {} steps (lr {}), SFT {} steps (lr {}), GRPO {} steps (lr {}, G = {}, {} prompts per step), SFT on rollouts {} steps; {} eval samples per task, every {} steps\n- rerun: `tessera study --preset {} --name {}{}` (finished stages are kept; a stopped study resumes)\n",
        match &study.inputs.model {
            Some(m) => format!("the checkpoint {}", m.display()),
            None => format!(
                "the tiny preset pretrained on the prior suites ({} steps of `{}`)",
                p.pretrain_steps, p.pretrain_data
            ),
        },
        jig,
        p.grid.0,
        p.grid.1,
        priors.join(", "),
        p.name,
        p.batch_size,
        p.pretrain_steps,
        p.pretrain_lr,
        p.sft_steps,
        p.sft_lr,
        p.grpo_steps,
        p.grpo_lr,
        p.group_size,
        p.prompts_per_step,
        p.rollout_sft_steps,
        p.eval_samples,
        p.eval_every,
        p.name,
        dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        // Where it ran, when not the default CPU in f32.
        match (study.inputs.device, study.inputs.dtype) {
            (crate::Device::Cpu, DType::F32) => String::new(),
            (device, DType::F32) => format!(" --device {device}"),
            (device, dtype) => format!(" --device {device} --dtype {dtype}"),
        },
    );

    let _ = writeln!(r, "## Jigsaw accuracy\n");
    let _ = writeln!(r, "| model | steps | {jig} accuracy | training time |");
    let _ = writeln!(r, "|---|---:|---:|---:|");
    for a in arms {
        match &a.skipped {
            Some(why) => {
                let _ = writeln!(r, "| {} | – | skipped: {why} | – |", a.label);
            }
            None => {
                let _ = writeln!(
                    r,
                    "| {} | {} | {} | {} |",
                    a.label,
                    a.steps,
                    score(a, &jig).map_or("–".into(), |v| format!("{v:.2}")),
                    if a.seconds > 0.0 {
                        format!("{:.0} s", a.seconds)
                    } else {
                        "–".into()
                    }
                );
            }
        }
    }

    let _ = writeln!(
        r,
        "\n## Forgetting: change of every prior suite against the base\n"
    );
    let _ = write!(r, "| suite | base |");
    for a in &arms[1..] {
        let _ = write!(r, " {} |", a.label);
    }
    let _ = writeln!(r);
    let _ = writeln!(r, "|---|---:|{}", "---:|".repeat(arms.len() - 1));
    for task in &priors {
        let b = score(base, task);
        let _ = write!(
            r,
            "| {task} | {} |",
            b.map_or("–".into(), |v| format!("{v:.2}"))
        );
        for a in &arms[1..] {
            let _ = write!(r, " {} |", fmt_change(score(a, task), b));
        }
        let _ = writeln!(r);
    }
    let _ = write!(r, "| **mean change** | |");
    for a in &arms[1..] {
        let _ = write!(
            r,
            " {} |",
            mean_prior_change(a, base, &priors).map_or("–".into(), |v| format!("**{v:+.3}**"))
        );
    }
    let _ = writeln!(r);

    let _ = writeln!(r, "\n## Curves\n");
    for (f, caption) in curves(study, arms, &priors)? {
        let _ = writeln!(r, "![{caption}]({f})\n");
    }

    let _ = writeln!(r, "## Learning dynamics\n");
    let _ = writeln!(
        r,
        "{}",
        dynamics.unwrap_or("Not measured in this preset (dynamics_samples = 0).\n")
    );

    let _ = writeln!(r, "## Reading\n");
    let change = |name: &str| {
        arms.iter()
            .find(|a| a.name == name)
            .and_then(|a| mean_prior_change(a, base, &priors))
    };
    let acc = |name: &str| {
        arms.iter()
            .find(|a| a.name == name)
            .and_then(|a| score(a, &jig))
    };
    let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:+.3}"));
    let a = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
    let _ = writeln!(
        r,
        "Mean change of the prior suites: SFT {} (jigsaw {}), GRPO {} (jigsaw {}), SFT on GRPO rollouts {} (jigsaw {}).",
        f(change("sft")), a(acc("sft")), f(change("grpo")), a(acc("grpo")), f(change("sft-rollouts")), a(acc("sft-rollouts"))
    );
    let verdict = match (change("sft"), change("sft-rollouts"), change("grpo")) {
        (Some(s), Some(rl), Some(g)) if s < rl && s < g => format!(
            "The paper's ordering holds here: SFT on answers forgot more ({s:+.3}) than SFT on correct GRPO rollouts ({rl:+.3}) and GRPO ({g:+.3})."
        ),
        (Some(s), Some(rl), Some(g)) => format!(
            "The paper's ordering does not hold here: SFT on answers {s:+.3}, SFT on GRPO rollouts {rl:+.3}, GRPO {g:+.3}."
        ),
        _ => "Not every arm ran, so the ordering cannot be read.".to_string(),
    };
    let _ = writeln!(
        r,
        "{verdict} Compare arms at matched jigsaw accuracy as well as matched steps (the curves above): an arm that has not learned the jigsaw has little reason to forget.\n"
    );
    let path = dir.join("report.md");
    std::fs::write(&path, r).map_err(|e| Error::file(&path, format!("cannot write: {e}")))
}
