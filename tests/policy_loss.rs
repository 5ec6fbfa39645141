//! The GRPO loss family, group advantages and `tessera policy-loss` against PyTorch
//! autograd (tests/fixtures/policy_loss/cases.json, written by
//! tools/parity/make_policy_loss_fixtures.py).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use tessera::io::TensorFile;
use tessera::rl::{
    group_advantages, policy_loss_and_grad, LossType, PolicyLossConfig, PolicyLossInputs,
    ScaleRewards,
};
use tessera::{DType, Tensor};

const TOL: f64 = 1e-5;

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/policy_loss/cases.json")).expect("fixture parses")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// The fixture's f64 values are f32-representable: this is exact.
fn f32_tensor(v: &Value, shape: &[usize]) -> Tensor {
    let data: Vec<f32> = floats(v).iter().map(|&x| x as f32).collect();
    Tensor::from_vec(data, shape).unwrap()
}

/// Relative error, with an absolute floor for values near zero (masked gradients are 0).
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1e-6))
        .fold(0.0, f64::max)
}

struct Inputs {
    b: usize,
    t: usize,
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
}

fn inputs(fx: &Value) -> Inputs {
    let (b, t) = (
        fx["B"].as_u64().unwrap() as usize,
        fx["T"].as_u64().unwrap() as usize,
    );
    let i = &fx["inputs"];
    Inputs {
        b,
        t,
        logps: f32_tensor(&i["logps"], &[b, t]),
        old_logps: f32_tensor(&i["old_logps"], &[b, t]),
        ref_logps: f32_tensor(&i["ref_logps"], &[b, t]),
        advantages: f32_tensor(&i["advantages"], &[b]),
        mask: f32_tensor(&i["mask"], &[b, t]),
    }
}

fn config(case: &Value) -> PolicyLossConfig {
    PolicyLossConfig {
        loss_type: case["loss_type"].as_str().unwrap().parse().unwrap(),
        beta: case["beta"].as_f64().unwrap(),
        epsilon: case["epsilon"].as_f64().unwrap(),
        epsilon_high: Some(case["epsilon_high"].as_f64().unwrap()),
        max_completion_len: case["max_completion_len"].as_u64().map(|n| n as usize),
    }
}

/// Runs every loss case in `dtype` and returns (name, loss error, grad error).
fn library_errors(dtype: DType) -> Vec<(String, f64, f64)> {
    let fx = fixture();
    let x = inputs(&fx);
    let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
    let (logps, old, reference, adv, mask) = (
        cast(&x.logps),
        cast(&x.old_logps),
        cast(&x.ref_logps),
        cast(&x.advantages),
        cast(&x.mask),
    );
    let mut out = Vec::new();
    for case in fx["loss_cases"].as_array().unwrap() {
        let cfg = config(case);
        let inp = PolicyLossInputs {
            logps: &logps,
            old_logps: &old,
            ref_logps: Some(&reference),
            advantages: &adv,
            mask: &mask,
        };
        let (loss, grad) = policy_loss_and_grad(&inp, &cfg).unwrap();
        assert_eq!(loss.numel(), 1);
        assert_eq!(grad.shape(), &[x.b, x.t]);
        assert_eq!(grad.dtype(), dtype);
        let le = rel_err(
            &[loss.to_scalar().unwrap()],
            &[case["loss"].as_f64().unwrap()],
        );
        let ge = rel_err(&grad.to_f64s().unwrap(), &floats(&case["grad_logps"]));
        out.push((case["name"].as_str().unwrap().to_string(), le, ge));
    }
    out
}

fn assert_all_within(label: &str, errs: &[(String, f64, f64)]) {
    assert_eq!(errs.len(), 20, "every case of the fixture");
    for (name, le, ge) in errs {
        eprintln!("{label} {name}: loss rel err {le:.2e}, grad max rel err {ge:.2e}");
    }
    for (name, le, ge) in errs {
        assert!(
            *le < TOL && *ge < TOL,
            "{label} {name}: loss {le:.2e}, grad {ge:.2e}"
        );
    }
}

#[test]
fn loss_and_grad_match_torch_in_f64() {
    assert_all_within("f64", &library_errors(DType::F64));
}

#[test]
fn loss_and_grad_match_torch_in_f32() {
    assert_all_within("f32", &library_errors(DType::F32));
}

#[test]
fn dapo_is_bnpo_at_one_batch_and_beta_zero_needs_no_reference() {
    let fx = fixture();
    let x = inputs(&fx);
    let run = |loss_type: LossType, reference: Option<&Tensor>, beta: f64| {
        let inp = PolicyLossInputs {
            logps: &x.logps,
            old_logps: &x.old_logps,
            ref_logps: reference,
            advantages: &x.advantages,
            mask: &x.mask,
        };
        let cfg = PolicyLossConfig {
            loss_type,
            beta,
            ..Default::default()
        };
        let (l, g) = policy_loss_and_grad(&inp, &cfg).unwrap();
        (l.to_scalar().unwrap(), g.to_f64s().unwrap())
    };
    assert_eq!(
        run(LossType::Dapo, None, 0.0),
        run(LossType::Bnpo, None, 0.0)
    );
    assert_eq!(
        run(LossType::Grpo, None, 0.0),
        run(LossType::Grpo, Some(&x.ref_logps), 0.0)
    );
}

#[test]
fn library_errors_name_the_tensor() {
    let fx = fixture();
    let x = inputs(&fx);
    let bad_adv = x.advantages.unsqueeze(1).unwrap();
    let bad_mask = x.mask.narrow(1, 0, 3).unwrap();
    let cases: [(&str, PolicyLossInputs, f64); 3] = [
        (
            "advantages",
            PolicyLossInputs {
                logps: &x.logps,
                old_logps: &x.old_logps,
                ref_logps: None,
                advantages: &bad_adv,
                mask: &x.mask,
            },
            0.0,
        ),
        (
            "mask",
            PolicyLossInputs {
                logps: &x.logps,
                old_logps: &x.old_logps,
                ref_logps: None,
                advantages: &x.advantages,
                mask: &bad_mask,
            },
            0.0,
        ),
        (
            "ref_logps",
            PolicyLossInputs {
                logps: &x.logps,
                old_logps: &x.old_logps,
                ref_logps: None,
                advantages: &x.advantages,
                mask: &x.mask,
            },
            0.04,
        ),
    ];
    for (name, inp, beta) in cases {
        let cfg = PolicyLossConfig {
            beta,
            ..Default::default()
        };
        let err = policy_loss_and_grad(&inp, &cfg).expect_err("an error");
        let msg = err.to_string();
        assert!(msg.contains(&format!("'{name}'")), "{name}: {msg}");
    }
    assert!("ppo".parse::<LossType>().is_err());
}

#[test]
fn group_advantages_match_torch() {
    let fx = fixture();
    let rewards = f32_tensor(&fx["rewards"], &[12])
        .to_dtype(DType::F64)
        .unwrap();
    for case in fx["advantage_cases"].as_array().unwrap() {
        let g = case["group_size"].as_u64().unwrap() as usize;
        let scale: ScaleRewards = case["scale_rewards"].as_str().unwrap().parse().unwrap();
        let got = group_advantages(&rewards, g, scale).unwrap();
        let err = rel_err(&got.to_f64s().unwrap(), &floats(&case["advantages"]));
        eprintln!("advantages {}: max rel err {err:.2e}", case["name"]);
        assert!(err < TOL, "{}: {err:.2e}", case["name"]);
    }
    let flat = f32_tensor(&fx["flat_rewards"], &[6])
        .to_dtype(DType::F64)
        .unwrap();
    let got = group_advantages(&flat, 3, ScaleRewards::Group).unwrap();
    let err = rel_err(
        &got.to_f64s().unwrap(),
        &floats(&fx["flat_advantages_group"]),
    );
    eprintln!("advantages flat group: max rel err {err:.2e}");
    assert!(err < TOL);
    // f32 in, f32 out.
    let r32 = f32_tensor(&fx["rewards"], &[12]);
    assert_eq!(
        group_advantages(&r32, 4, ScaleRewards::Group)
            .unwrap()
            .dtype(),
        DType::F32
    );
    assert!(group_advantages(&rewards, 5, ScaleRewards::Group).is_err());
    assert!(group_advantages(&rewards, 1, ScaleRewards::Group).is_err());
    assert!(group_advantages(&rewards, 1, ScaleRewards::None).is_ok());
}

// ---- the CLI ----

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

fn write_inputs(path: &Path, tensors: &[(&str, &Tensor)]) {
    tessera::io::save(path, tensors, None).unwrap();
}

/// Runs the binary; Ok(output file) or Err(stderr).
fn policy_loss_cli(input: &Path, out: &Path, args: &[String]) -> Result<PathBuf, String> {
    let o = tessera()
        .arg("policy-loss")
        .arg("--inputs")
        .arg(input)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    if o.status.success() {
        Ok(out.to_path_buf())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

#[test]
fn cli_round_trip_matches_torch_for_every_case() {
    let fx = fixture();
    let x = inputs(&fx);
    let input = tmp("policy_loss_in.safetensors");
    write_inputs(
        &input,
        &[
            ("logps", &x.logps),
            ("old_logps", &x.old_logps),
            ("ref_logps", &x.ref_logps),
            ("advantages", &x.advantages),
            ("mask", &x.mask),
        ],
    );
    let mut errs = Vec::new();
    for case in fx["loss_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut args = vec![
            "--loss-type".to_string(),
            case["loss_type"].as_str().unwrap().to_string(),
            "--beta".into(),
            case["beta"].to_string(),
            "--epsilon".into(),
            case["epsilon"].to_string(),
            "--epsilon-high".into(),
            case["epsilon_high"].to_string(),
        ];
        if let Some(n) = case["max_completion_len"].as_u64() {
            args.extend(["--max-completion-len".to_string(), n.to_string()]);
        }
        let out = policy_loss_cli(
            &input,
            &tmp(&format!("policy_loss_{name}.safetensors")),
            &args,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let f = TensorFile::open(&out).unwrap();
        assert_eq!(f.dtype("loss").unwrap(), DType::F32);
        assert_eq!(f.shape("loss").unwrap(), &[] as &[usize]);
        assert_eq!(f.dtype("grad_logps").unwrap(), DType::F32);
        assert_eq!(f.shape("grad_logps").unwrap(), &[x.b, x.t]);
        let loss = f.get("loss").unwrap().to_scalar().unwrap();
        let grad = f.get("grad_logps").unwrap().to_f64s().unwrap();
        errs.push((
            name.to_string(),
            rel_err(&[loss], &[case["loss"].as_f64().unwrap()]),
            rel_err(&grad, &floats(&case["grad_logps"])),
        ));
    }
    assert_all_within("cli", &errs);

    // --epsilon-high defaults to --epsilon, --beta to 0 (ref_logps may then be absent).
    let no_ref = tmp("policy_loss_in_noref.safetensors");
    write_inputs(
        &no_ref,
        &[
            ("logps", &x.logps),
            ("old_logps", &x.old_logps),
            ("advantages", &x.advantages),
            ("mask", &x.mask),
        ],
    );
    let case = fx["loss_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "grpo_beta0.0_epshigh0.2")
        .unwrap();
    let out = policy_loss_cli(
        &no_ref,
        &tmp("policy_loss_defaults.safetensors"),
        &["--loss-type".into(), "grpo".into()],
    )
    .unwrap();
    let f = TensorFile::open(&out).unwrap();
    let le = rel_err(
        &[f.get("loss").unwrap().to_scalar().unwrap()],
        &[case["loss"].as_f64().unwrap()],
    );
    assert!(le < TOL, "defaults: {le:.2e}");
}

/// (label, tensors written, CLI args, text the error must contain).
type BadCase<'a> = (
    &'a str,
    Vec<(&'a str, &'a Tensor)>,
    &'a Vec<String>,
    &'a str,
);

#[test]
fn cli_errors_name_the_tensor() {
    let fx = fixture();
    let x = inputs(&fx);
    let adv2 = x.advantages.unsqueeze(1).unwrap();
    let mask64 = x.mask.to_dtype(DType::F64).unwrap();
    let beta = ["--loss-type", "bnpo", "--beta", "0.04"]
        .map(String::from)
        .to_vec();
    let plain = ["--loss-type", "bnpo"].map(String::from).to_vec();
    let cases: Vec<BadCase> = vec![
        (
            "missing mask",
            vec![
                ("logps", &x.logps),
                ("old_logps", &x.old_logps),
                ("advantages", &x.advantages),
            ],
            &plain,
            "'mask'",
        ),
        (
            "missing ref_logps with beta",
            vec![
                ("logps", &x.logps),
                ("old_logps", &x.old_logps),
                ("advantages", &x.advantages),
                ("mask", &x.mask),
            ],
            &beta,
            "'ref_logps'",
        ),
        (
            "advantages [B,1]",
            vec![
                ("logps", &x.logps),
                ("old_logps", &x.old_logps),
                ("advantages", &adv2),
                ("mask", &x.mask),
            ],
            &plain,
            "'advantages'",
        ),
        (
            "mask F64",
            vec![
                ("logps", &x.logps),
                ("old_logps", &x.old_logps),
                ("advantages", &x.advantages),
                ("mask", &mask64),
            ],
            &plain,
            "'mask'",
        ),
        (
            "missing logps",
            vec![
                ("old_logps", &x.old_logps),
                ("advantages", &x.advantages),
                ("mask", &x.mask),
            ],
            &plain,
            "'logps'",
        ),
    ];
    for (i, (label, tensors, args, want)) in cases.into_iter().enumerate() {
        let input = tmp(&format!("policy_loss_bad{i}.safetensors"));
        write_inputs(&input, &tensors);
        let err = policy_loss_cli(&input, &tmp("policy_loss_bad_out.safetensors"), args)
            .err()
            .unwrap_or_else(|| panic!("{label}: expected a failure"));
        assert!(err.contains(want), "{label}: {err}");
    }
    let input = tmp("policy_loss_bad0.safetensors");
    let err = policy_loss_cli(
        &input,
        &tmp("policy_loss_bad_out.safetensors"),
        &["--loss-type".into(), "ppo".into()],
    )
    .err()
    .unwrap();
    assert!(err.contains("ppo"), "{err}");
}
