//! The smoke preset of `tessera study` end to end: every stage runs, the report has every
//! section, and a second run resumes instead of retraining.

use std::path::PathBuf;
use tessera::study::{Inputs, Preset, Study};

#[test]
fn smoke_study_writes_a_complete_report() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("tessera-study-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let inputs = Inputs {
        tiny_dir: root.join("models/tiny"),
        ..Inputs::default()
    };
    let study = Study::new(Preset::smoke(), inputs.clone(), dir.clone()).unwrap();
    let arms = study.run().unwrap();
    let names: Vec<&str> = arms.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["base", "sft", "grpo", "sft-rollouts"]);
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for section in [
        "## Setup",
        "## Jigsaw accuracy",
        "## Forgetting",
        "## Curves",
        "## Learning dynamics",
        "## Reading",
    ] {
        assert!(
            report.contains(section),
            "report.md lacks '{section}':\n{report}"
        );
    }
    for suite in [
        "colour", "shape", "count", "position", "ocr", "rank", "facts",
    ] {
        assert!(
            report.contains(&format!("| {suite} |")),
            "no forgetting row for {suite}"
        );
    }
    for f in [
        "jigsaw.png",
        "prior.png",
        "prior-sft.png",
        "prior-grpo.png",
        "metrics.jsonl",
    ] {
        let p = dir.join(f);
        assert!(
            p.exists() && std::fs::metadata(&p).unwrap().len() > 0,
            "{f} missing"
        );
    }
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    for arm in ["base", "sft", "grpo"] {
        assert!(
            metrics.contains(&format!("\"arm\":\"{arm}\"")),
            "no metrics of {arm}"
        );
    }
    // Rerunning finds every stage finished and trains nothing again.
    let t0 = std::time::Instant::now();
    let again = Study::new(Preset::smoke(), inputs, dir.clone())
        .unwrap()
        .run()
        .unwrap();
    assert!(arms[1].trained_now && arms[1].seconds > 0.0);
    assert!(!again[1].trained_now, "sft retrained");
    assert!(!again[2].trained_now, "grpo retrained");
    assert_eq!(
        again[1].seconds, arms[1].seconds,
        "the training time is kept"
    );
    eprintln!(
        "second run (evaluation only): {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    // bf16 needs CUDA: refused before anything is written.
    let bf16 = Inputs {
        dtype: tessera::DType::BF16,
        ..inputs_for_errors()
    };
    let err = Study::new(Preset::smoke(), bf16, dir.clone())
        .err()
        .expect("bf16 on the CPU")
        .to_string();
    assert!(
        err.contains("bf16") && err.contains("--device cuda"),
        "{err}"
    );
    assert!(!dir.exists(), "a refused study wrote {}", dir.display());
}

fn inputs_for_errors() -> Inputs {
    Inputs {
        tiny_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny"),
        ..Inputs::default()
    }
}
