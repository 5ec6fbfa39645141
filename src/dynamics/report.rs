//! What `tessera dynamics` writes: influence.csv, summary.md and the influence.png heatmap.

use super::influence::{InfluenceReport, Stats};
use super::sample::Objective;
use crate::{Error, Result};
use image::{Rgb, RgbImage};
use std::fmt::Write as _;
use std::path::Path;

/// A quantity of pair (v, u).
type PairValue<'a> = Box<dyn Fn(usize, usize) -> f64 + 'a>;

/// influence.csv: one row per probe v; columns `probe, logprob, tokens`, then for every
/// training sample u the predicted Δ log π(x_v) | x_u (`predicted_u<u>`), the measured one
/// when measured (`actual_u<u>`), the gradient cosine (`cosine_u<u>`) and the LBK
/// (`lbk_u<u>`, from the measured Δ when there is one).
pub fn influence_csv(r: &InfluenceReport) -> String {
    let n_train = r.train.len();
    let mut columns: Vec<(&str, PairValue)> =
        vec![("predicted", Box::new(|v, u| r.predicted[v][u]))];
    if let Some(a) = &r.actual {
        columns.push(("actual", Box::new(move |v, u| a[v][u])));
    }
    columns.push(("cosine", Box::new(|v, u| r.cosine(v, u))));
    columns.push(("lbk", Box::new(|v, u| r.lbk(v, u))));
    let mut s = String::from("probe,logprob,tokens");
    for (name, _) in &columns {
        for u in 0..n_train {
            let _ = write!(s, ",{name}_u{u}");
        }
    }
    s.push('\n');
    for (v, stats) in r.probes.iter().enumerate() {
        let _ = write!(s, "{v},{:e},{}", stats.logprob, stats.tokens);
        for (_, f) in &columns {
            for u in 0..n_train {
                let _ = write!(s, ",{:e}", f(v, u));
            }
        }
        s.push('\n');
    }
    s
}

fn stats_row(s: &mut String, what: &str, st: Stats) {
    let _ = writeln!(
        s,
        "| {what} | {:.4e} | {:.4e} | {:.4e} | {:.4e} |",
        st.mean, st.mean_abs, st.min, st.max
    );
}

/// summary.md: the setup (key/value pairs the caller gives), the data sets' perplexity, the
/// influence statistics, prediction vs measurement, time per pair, and a row per training
/// sample.
pub fn summary_markdown(r: &InfluenceReport, setup: &[(String, String)]) -> String {
    let mut s = String::from("# Learning dynamics\n\n");
    s.push_str(
        "Δ log π(x_v) | x_u: change of a probe's completion log-probability after one SGD step \
         on training sample x_u; predicted = η·s_u·⟨∇ log π(x_v), ∇ log π(x_u)⟩ \
         (see docs/dynamics.md).\n\n",
    );
    s.push_str("## Setup\n\n| | |\n|---|---|\n");
    for (k, v) in setup {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let step = match r.step {
        Objective::LogProb => "θ ← θ + η ∇ log π(x_u)  (s_u = 1)",
        Objective::SftLoss => "θ ← θ − η ∇ L_SFT(x_u)  (s_u = 1/C_u)",
    };
    let _ = writeln!(s, "| step | {step} |");
    let _ = writeln!(s, "| η | {:e} |", r.lr);
    let _ = writeln!(
        s,
        "| selected parameters | {} tensors, {} elements |",
        r.num_tensors, r.num_params
    );

    s.push_str("\n## Data\n\n| set | samples | completion tokens | mean log π | perplexity |\n");
    s.push_str("|---|---|---|---|---|\n");
    for (name, set, ppl) in [
        ("train", &r.train, r.train_perplexity()),
        ("probe", &r.probes, r.probe_perplexity()),
    ] {
        let tokens: usize = set.iter().map(|x| x.tokens).sum();
        let mean_lp = set.iter().map(|x| x.logprob).sum::<f64>() / set.len().max(1) as f64;
        let _ = writeln!(
            s,
            "| {name} | {} | {tokens} | {mean_lp:.4} | {ppl:.4} |",
            set.len()
        );
    }

    s.push_str("\n## Influence over all (probe, train) pairs\n\n");
    s.push_str("| quantity | mean | mean abs | min | max |\n|---|---|---|---|---|\n");
    stats_row(&mut s, "predicted Δ log π", r.predicted_stats());
    if let Some(a) = r.actual_stats() {
        stats_row(&mut s, "actual Δ log π", a);
    }
    stats_row(
        &mut s,
        "M = ⟨∇ log π(x_v), ∇ log π(x_u)⟩",
        Stats::of(r.inner.iter().flatten().copied()),
    );
    stats_row(&mut s, "cosine", r.cosine_stats());
    let lbk_from = if r.actual.is_some() {
        "LBK (from actual Δ)"
    } else {
        "LBK (from predicted Δ)"
    };
    stats_row(&mut s, lbk_from, r.lbk_stats());

    if let (Some(a), Some(corr)) = (&r.actual, r.correlation()) {
        let err = Stats::of(
            r.predicted
                .iter()
                .flatten()
                .zip(a.iter().flatten())
                .map(|(p, m)| m - p),
        );
        s.push_str("\n## Predicted vs actual\n\n| | |\n|---|---|\n");
        let _ = writeln!(s, "| Pearson r | {corr:.6} |");
        let _ = writeln!(s, "| mean abs(actual − predicted) | {:.4e} |", err.mean_abs);
        let _ = writeln!(
            s,
            "| mean abs(actual − predicted) / mean abs(actual) | {:.4e} |",
            err.mean_abs / r.actual_stats().map_or(f64::NAN, |x| x.mean_abs)
        );
    }

    let pairs = r.pairs();
    s.push_str("\n## Time\n\n| phase | seconds | per (u, v) pair |\n|---|---|---|\n");
    let t = &r.timing;
    let per = |x: f64| x / pairs.max(1) as f64;
    let _ = writeln!(
        s,
        "| train gradients ({}) | {:.3} | {:.4e} |",
        r.train.len(),
        t.train_gradients_s,
        per(t.train_gradients_s)
    );
    let _ = writeln!(
        s,
        "| probe gradients + inner products ({}) | {:.3} | {:.4e} |",
        r.probes.len(),
        t.probe_gradients_s,
        per(t.probe_gradients_s)
    );
    let _ = writeln!(
        s,
        "| predicted, total | {:.3} | {:.4e} |",
        t.train_gradients_s + t.probe_gradients_s,
        r.predicted_s_per_pair()
    );
    if r.actual.is_some() {
        let _ = writeln!(
            s,
            "| actual (steps, forwards, restores) | {:.3} | {:.4e} |",
            t.actual_s,
            r.actual_s_per_pair()
        );
    }

    s.push_str("\n## Per training sample\n\n");
    s.push_str("| u | tokens | log π | ‖∇ log π‖ | mean predicted Δ | ");
    if r.actual.is_some() {
        s.push_str("mean actual Δ | ");
    }
    s.push_str("mean cosine | mean LBK |\n|---|---|---|---|---|");
    if r.actual.is_some() {
        s.push_str("---|");
    }
    s.push_str("---|---|\n");
    let n_probe = r.probes.len().max(1) as f64;
    for (u, st) in r.train.iter().enumerate() {
        let col = |f: &dyn Fn(usize) -> f64| (0..r.probes.len()).map(f).sum::<f64>() / n_probe;
        let _ = write!(
            s,
            "| {u} | {} | {:.4} | {:.4e} | {:.4e} | ",
            st.tokens,
            st.logprob,
            r.train_grad_norms[u],
            col(&|v| r.predicted[v][u])
        );
        if let Some(a) = &r.actual {
            let _ = write!(s, "{:.4e} | ", col(&|v| a[v][u]));
        }
        let _ = writeln!(
            s,
            "{:.4} | {:.4e} |",
            col(&|v| r.cosine(v, u)),
            col(&|v| r.lbk(v, u))
        );
    }
    let _ = writeln!(
        s,
        "\ninfluence.png: rows probes, columns training samples; predicted Δ{}; blue < 0 < red, \
         white 0, full colour at |Δ| = {:.4e}.",
        if r.actual.is_some() {
            " (left) and actual Δ (right)"
        } else {
            ""
        },
        heat_scale(r)
    );
    s
}

/// The |Δ| that gets full colour: the largest over the panels shown.
fn heat_scale(r: &InfluenceReport) -> f64 {
    let mut m = r.predicted_stats();
    if let Some(a) = r.actual_stats() {
        m.min = m.min.min(a.min);
        m.max = m.max.max(a.max);
    }
    m.min.abs().max(m.max.abs())
}

/// Diverging map: blue (−1) – white (0) – red (+1); grey for NaN.
pub fn diverging(t: f64) -> Rgb<u8> {
    if t.is_nan() {
        return Rgb([128, 128, 128]);
    }
    let t = t.clamp(-1.0, 1.0);
    let end = if t < 0.0 {
        [33.0, 102.0, 172.0]
    } else {
        [178.0, 24.0, 43.0]
    };
    let a = t.abs();
    let c = |e: f64| (255.0 + a * (e - 255.0)).round() as u8;
    Rgb([c(end[0]), c(end[1]), c(end[2])])
}

/// The heatmap image: rows probes, columns training samples, one panel for the predicted Δ
/// and, when measured, one for the actual Δ to its right (a grey bar between), on a common
/// colour scale. Cells are 2–24 pixels a side, sized to keep each panel near 600 pixels.
pub fn heatmap(r: &InfluenceReport) -> RgbImage {
    let (rows, cols) = (r.probes.len(), r.train.len());
    let cell_w = (600 / cols.max(1)).clamp(2, 24) as u32;
    let cell_h = (600 / rows.max(1)).clamp(2, 24) as u32;
    let mut panels = vec![&r.predicted];
    if let Some(a) = &r.actual {
        panels.push(a);
    }
    let gap = 4u32;
    let panel_w = cols as u32 * cell_w;
    let width = panels.len() as u32 * panel_w + (panels.len() as u32 - 1) * gap;
    let height = rows as u32 * cell_h;
    let mut img = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([128, 128, 128]));
    let scale = heat_scale(r);
    for (k, panel) in panels.iter().enumerate() {
        let x0 = k as u32 * (panel_w + gap);
        for (v, row) in panel.iter().enumerate() {
            for (u, &x) in row.iter().enumerate() {
                let colour = diverging(if scale > 0.0 { x / scale } else { 0.0 });
                for dy in 0..cell_h {
                    for dx in 0..cell_w {
                        img.put_pixel(x0 + u as u32 * cell_w + dx, v as u32 * cell_h + dy, colour);
                    }
                }
            }
        }
    }
    img
}

/// Writes influence.csv, summary.md and influence.png into `dir` (created if missing).
pub fn write_report(dir: &Path, r: &InfluenceReport, setup: &[(String, String)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::file(&path, format!("cannot write: {e}")))
    };
    write("influence.csv", influence_csv(r))?;
    write("summary.md", summary_markdown(r, setup))?;
    let path = dir.join("influence.png");
    heatmap(r)
        .save(&path)
        .map_err(|e| Error::file(&path, format!("cannot write PNG: {e}")))
}
