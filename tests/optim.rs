//! Optimisers, clipping and schedules against PyTorch (tests/fixtures/optim_torch.json,
//! written by tools/fixtures/make_optim_fixture.py).
//!
//! Tolerances, per element, with `b` the torch value and `a` ours:
//!   f64 runs: |a - b| <= 1e-12 * max(|b|, 1e-3)
//!   f32 runs: |a - b| <= 1e-6  * max(|b|, 1e-3)
//! Gradients reach the parameters through the real autograd path: loss = sum_i (p_i * g_i)
//! summed to a scalar, `backward()`, so `p_i.grad() == g_i` exactly.

use serde_json::Value;
use tessera::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule, ParamGroup, Sgd, SgdConfig};
use tessera::{DType, Result, Tensor};

const TOL_F64: f64 = 1e-12;
const TOL_F32: f64 = 1e-6;
const FLOOR: f64 = 1e-3;

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/optim_torch.json")).expect("fixture parses")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Inputs (initial parameters, gradients) are f32 values stored as their shortest decimal;
/// torch ran on their exact value (also in the f64 runs), so round them back to f32.
fn f32_floats(v: &Value) -> Vec<f64> {
    floats(v).into_iter().map(|x| x as f32 as f64).collect()
}

fn shapes(fx: &Value) -> Vec<Vec<usize>> {
    fx["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect()
        })
        .collect()
}

fn make_params(fx: &Value, dtype: DType) -> Vec<Tensor> {
    let init = fx["initial_params"].as_array().unwrap();
    shapes(fx)
        .iter()
        .zip(init)
        .map(|(s, v)| {
            Tensor::from_f64s(&f32_floats(v), s, dtype)
                .unwrap()
                .requires_grad_()
        })
        .collect()
}

/// Gradients of step `step`: None where the parameter gets no gradient.
fn step_grads(fx: &Value, step: usize) -> Vec<Option<Vec<f64>>> {
    fx["grads"][step]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            if g.is_null() {
                None
            } else {
                Some(f32_floats(g))
            }
        })
        .collect()
}

/// Clears the grads, then backpropagates loss = sum_i sum(p_i * g_i): grad(p_i) = g_i.
fn set_grads(params: &[Tensor], grads: &[Option<Vec<f64>>]) -> Result<()> {
    let mut loss: Option<Tensor> = None;
    for (p, g) in params.iter().zip(grads) {
        p.zero_grad();
        if let Some(g) = g {
            let g = Tensor::from_f64s(g, p.shape(), p.dtype())?;
            let term = p.mul(&g)?.sum_all()?;
            loss = Some(match loss {
                None => term,
                Some(l) => l.add(&term)?,
            });
        }
    }
    loss.expect("some parameter has a gradient").backward()
}

fn values(p: &Tensor) -> Vec<f64> {
    p.to_f64s().unwrap()
}

/// max over elements of |a - b| / max(|b|, FLOOR).
fn max_rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(FLOOR))
        .fold(0.0, f64::max)
}

enum Opt {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Opt {
    fn step(&mut self, lr: f64) -> Result<()> {
        match self {
            Opt::AdamW(o) => o.step(lr),
            Opt::Sgd(o) => o.step(lr),
        }
    }
}

/// Runs all fixture steps and returns the worst relative error against `expected`
/// (run[step][param] = values after that step).
fn trajectory_error(
    fx: &Value,
    dtype: DType,
    lr: f64,
    expected: &Value,
    make: impl FnOnce(Vec<Tensor>) -> Opt,
) -> f64 {
    let params = make_params(fx, dtype);
    let mut opt = make(params.clone());
    let steps = fx["steps"].as_u64().unwrap() as usize;
    let mut worst = 0.0f64;
    for step in 0..steps {
        set_grads(&params, &step_grads(fx, step)).unwrap();
        opt.step(lr).unwrap();
        for (i, p) in params.iter().enumerate() {
            let mut want = floats(&expected[step][i]);
            if dtype == DType::F32 {
                // The fixture stores the shortest decimal of each f32: round it back.
                want.iter_mut().for_each(|v| *v = *v as f32 as f64);
            }
            let err = max_rel_err(&values(p), &want);
            worst = worst.max(err);
        }
    }
    worst
}

fn adamw_config(run: &Value) -> AdamWConfig {
    let betas = floats(&run["betas"]);
    AdamWConfig {
        betas: (betas[0], betas[1]),
        eps: run["eps"].as_f64().unwrap(),
        weight_decay: run["weight_decay"].as_f64().unwrap_or(0.0),
    }
}

fn adamw_error(dtype: DType) -> f64 {
    let fx = fixture();
    let run = &fx["adamw"];
    let key = if dtype == DType::F32 { "f32" } else { "f64" };
    let cfg = adamw_config(run);
    trajectory_error(&fx, dtype, run["lr"].as_f64().unwrap(), &run[key], |p| {
        Opt::AdamW(AdamW::new(p, cfg).unwrap())
    })
}

#[test]
fn adamw_f64_matches_torch() {
    let err = adamw_error(DType::F64);
    println!("AdamW f64 max relative error vs torch: {err:.3e}");
    assert!(err <= TOL_F64, "AdamW f64: max relative error {err:e}");
}

#[test]
fn adamw_f32_matches_torch() {
    let err = adamw_error(DType::F32);
    println!("AdamW f32 max relative error vs torch: {err:.3e}");
    assert!(err <= TOL_F32, "AdamW f32: max relative error {err:e}");
}

#[test]
fn adamw_param_groups_match_torch() {
    let fx = fixture();
    let run = &fx["adamw_groups"];
    let cfg = adamw_config(run);
    let spec: Vec<(Vec<usize>, f64)> = run["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let idx = g["params"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as usize)
                .collect();
            (idx, g["weight_decay"].as_f64().unwrap())
        })
        .collect();
    let err = trajectory_error(
        &fx,
        DType::F64,
        run["lr"].as_f64().unwrap(),
        &run["f64"],
        |p| {
            let groups = spec
                .iter()
                .map(|(idx, wd)| ParamGroup::new(idx.iter().map(|&i| p[i].clone()).collect(), *wd))
                .collect();
            Opt::AdamW(AdamW::with_groups(groups, cfg).unwrap())
        },
    );
    println!("AdamW (2 groups) f64 max relative error vs torch: {err:.3e}");
    assert!(err <= TOL_F64, "AdamW groups: max relative error {err:e}");
}

fn sgd_error(name: &str, dtype: DType) -> f64 {
    let fx = fixture();
    let run = &fx[name];
    let cfg = SgdConfig {
        momentum: run["momentum"].as_f64().unwrap(),
        dampening: run["dampening"].as_f64().unwrap(),
        nesterov: run["nesterov"].as_bool().unwrap(),
        weight_decay: run["weight_decay"].as_f64().unwrap(),
    };
    let key = if dtype == DType::F32 { "f32" } else { "f64" };
    trajectory_error(&fx, dtype, run["lr"].as_f64().unwrap(), &run[key], |p| {
        Opt::Sgd(Sgd::new(p, cfg).unwrap())
    })
}

#[test]
fn sgd_momentum_matches_torch() {
    for (dtype, tol) in [(DType::F64, TOL_F64), (DType::F32, TOL_F32)] {
        let err = sgd_error("sgd_momentum", dtype);
        println!("SGD momentum {dtype} max relative error vs torch: {err:.3e}");
        assert!(
            err <= tol,
            "SGD momentum {dtype}: max relative error {err:e}"
        );
    }
}

#[test]
fn sgd_nesterov_matches_torch() {
    for (dtype, tol) in [(DType::F64, TOL_F64), (DType::F32, TOL_F32)] {
        let err = sgd_error("sgd_nesterov", dtype);
        println!("SGD Nesterov {dtype} max relative error vs torch: {err:.3e}");
        assert!(
            err <= tol,
            "SGD Nesterov {dtype}: max relative error {err:e}"
        );
    }
}

#[test]
fn adamw_state_round_trip_resumes_bit_exactly() {
    let fx = fixture();
    let cfg = adamw_config(&fx["adamw"]);
    let lr = 1e-2;
    let steps = fx["steps"].as_u64().unwrap() as usize;
    let split = 4;

    let a = make_params(&fx, DType::F32);
    let mut opt_a = AdamW::new(a.clone(), cfg).unwrap();
    for step in 0..split {
        set_grads(&a, &step_grads(&fx, step)).unwrap();
        opt_a.step(lr).unwrap();
    }
    let snapshot = opt_a.state().unwrap();
    let snapshot_m0 = values(&snapshot.params[0].as_ref().unwrap().exp_avg);
    assert_eq!(snapshot.steps, split as u64);
    // Parameter 3 had no gradient at step 0, parameter 2 none at step 3.
    let counts: Vec<u64> = snapshot
        .params
        .iter()
        .map(|s| s.as_ref().unwrap().step)
        .collect();
    assert_eq!(counts, vec![4, 4, 3, 3]);

    // A fresh optimiser on copies of the parameters, resumed from the snapshot.
    let b: Vec<Tensor> = a
        .iter()
        .map(|p| {
            Tensor::from_f64s(&values(p), p.shape(), p.dtype())
                .unwrap()
                .requires_grad_()
        })
        .collect();
    let mut opt_b = AdamW::new(b.clone(), cfg).unwrap();
    opt_b.load_state(&snapshot).unwrap();
    assert_eq!(opt_b.steps(), split as u64);

    for step in split..steps {
        for (params, opt) in [(&a, &mut opt_a), (&b, &mut opt_b)] {
            set_grads(params, &step_grads(&fx, step)).unwrap();
            opt.step(lr).unwrap();
        }
    }
    for (pa, pb) in a.iter().zip(&b) {
        assert_eq!(values(pa), values(pb), "resumed run diverged");
    }
    // The snapshot is a copy: later steps did not change it.
    assert_eq!(
        values(&snapshot.params[0].as_ref().unwrap().exp_avg),
        snapshot_m0
    );
    let (sa, sb) = (opt_a.state().unwrap(), opt_b.state().unwrap());
    for (x, y) in sa.params.iter().zip(&sb.params) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        assert_eq!(x.step, y.step);
        assert_eq!(values(&x.exp_avg), values(&y.exp_avg));
        assert_eq!(values(&x.exp_avg_sq), values(&y.exp_avg_sq));
    }
}

#[test]
fn adamw_load_state_rejects_mismatches() {
    let fx = fixture();
    let params = make_params(&fx, DType::F64);
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default()).unwrap();
    set_grads(&params, &step_grads(&fx, 1)).unwrap();
    opt.step(1e-3).unwrap();
    let mut state = opt.state().unwrap();

    let mut short = state.clone();
    short.params.pop();
    assert!(opt.load_state(&short).is_err());

    let p0 = state.params[0].as_mut().unwrap();
    p0.exp_avg = Tensor::zeros(&[4, 3], DType::F64).unwrap();
    let err = opt.load_state(&state).unwrap_err().to_string();
    assert!(err.contains("exp_avg"), "{err}");

    let mut wrong_dtype = opt.state().unwrap();
    wrong_dtype.params[1].as_mut().unwrap().exp_avg_sq = Tensor::zeros(&[5], DType::F32).unwrap();
    assert!(opt.load_state(&wrong_dtype).is_err());
    // Failed loads left the state alone.
    assert_eq!(opt.steps(), 1);
}

#[test]
fn sgd_state_round_trip() {
    let fx = fixture();
    let cfg = SgdConfig {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 0.01,
        ..SgdConfig::default()
    };
    let a = make_params(&fx, DType::F64);
    let mut opt_a = Sgd::new(a.clone(), cfg).unwrap();
    set_grads(&a, &step_grads(&fx, 0)).unwrap();
    opt_a.step(0.1).unwrap();
    let snap = opt_a.state().unwrap();
    assert!(snap.momentum_buffers[3].is_none(), "no grad yet, no buffer");
    assert!(snap.momentum_buffers[0].is_some());

    let b: Vec<Tensor> = a
        .iter()
        .map(|p| {
            Tensor::from_f64s(&values(p), p.shape(), p.dtype())
                .unwrap()
                .requires_grad_()
        })
        .collect();
    let mut opt_b = Sgd::new(b.clone(), cfg).unwrap();
    opt_b.load_state(&snap).unwrap();
    for step in 1..4 {
        for (params, opt) in [(&a, &mut opt_a), (&b, &mut opt_b)] {
            set_grads(params, &step_grads(&fx, step)).unwrap();
            opt.step(0.1).unwrap();
        }
    }
    for (pa, pb) in a.iter().zip(&b) {
        assert_eq!(values(pa), values(pb));
    }
}

#[test]
fn params_without_grad_are_untouched() {
    // With weight decay, a stepped parameter would shrink even with a zero gradient.
    let p = Tensor::from_f64s(&[1.0, -2.0], &[2], DType::F32)
        .unwrap()
        .requires_grad_();
    let q = Tensor::from_f64s(&[3.0], &[1], DType::F32)
        .unwrap()
        .requires_grad_();
    let cfg = AdamWConfig {
        weight_decay: 0.5,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(vec![p.clone(), q.clone()], cfg).unwrap();
    q.mul_scalar(2.0)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    opt.step(0.1).unwrap();
    assert_eq!(values(&p), vec![1.0, -2.0]);
    assert_ne!(values(&q), vec![3.0]);
    let st = opt.state().unwrap();
    assert!(st.params[0].is_none());
    assert_eq!(st.params[1].as_ref().unwrap().step, 1);
}

#[test]
fn gradient_sharing_the_parameter_buffer() {
    // backward_with on a leaf stores the seed itself as the gradient: here the parameter's
    // own buffer. The update must read a copy (no lock self-deadlock, no aliasing).
    let p = Tensor::from_f64s(&[1.0, 2.0], &[2], DType::F64)
        .unwrap()
        .requires_grad_();
    p.backward_with(&p).unwrap();
    let mut opt = Sgd::new(
        vec![p.clone()],
        SgdConfig {
            momentum: 0.0,
            ..SgdConfig::default()
        },
    )
    .unwrap();
    opt.step(0.5).unwrap();
    assert_eq!(values(&p), vec![0.5, 1.0]);
}

#[test]
fn construction_and_step_errors() {
    let p = Tensor::from_f64s(&[1.0; 6], &[2, 3], DType::F32)
        .unwrap()
        .requires_grad_();
    // Duplicate parameter.
    assert!(AdamW::new(vec![p.clone(), p.clone()], AdamWConfig::default()).is_err());
    // Non-float parameter.
    let bf = Tensor::from_f64s(&[1.0], &[1], DType::BF16)
        .unwrap()
        .requires_grad_();
    assert!(Sgd::new(vec![bf], SgdConfig::default()).is_err());
    // Non-contiguous parameter (a transposed view).
    let t = p.t().unwrap().requires_grad_();
    assert!(AdamW::new(vec![t], AdamWConfig::default()).is_err());
    // Bad hyper-parameters.
    let bad_betas = AdamWConfig {
        betas: (0.9, 1.0),
        ..AdamWConfig::default()
    };
    assert!(AdamW::new(vec![p.clone()], bad_betas).is_err());
    let bad_nesterov = SgdConfig {
        momentum: 0.0,
        nesterov: true,
        ..SgdConfig::default()
    };
    assert!(Sgd::new(vec![p.clone()], bad_nesterov).is_err());
    assert!(AdamW::with_groups(
        vec![ParamGroup::new(vec![p.clone()], -1.0)],
        AdamWConfig::default()
    )
    .is_err());
    // Bad learning rate.
    let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default()).unwrap();
    assert!(opt.step(f64::NAN).is_err());
    assert!(opt.step(-1.0).is_err());
    assert_eq!(opt.steps(), 0);
}

// ------------------------------------------------------------------ clipping

fn param_with_grad(grad: &[f64], dtype: DType) -> Tensor {
    let p = Tensor::zeros(&[grad.len()], dtype)
        .unwrap()
        .requires_grad_();
    let g = Tensor::from_f64s(grad, &[grad.len()], dtype).unwrap();
    p.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
    p
}

#[test]
fn clip_grad_norm_hand_computed() {
    for dtype in [DType::F64, DType::F32] {
        // Global norm of (3, 4, 12) is 13.
        let a = param_with_grad(&[3.0, 4.0], dtype);
        let b = param_with_grad(&[12.0], dtype);
        let none = Tensor::zeros(&[3], dtype).unwrap().requires_grad_();
        let params = [a.clone(), none.clone(), b.clone()];

        // max_norm above the norm: nothing changes.
        let n = clip_grad_norm(&params, 20.0).unwrap();
        assert_eq!(n, 13.0);
        assert_eq!(values(&a.grad().unwrap()), vec![3.0, 4.0]);

        let n = clip_grad_norm(&params, 6.5).unwrap();
        assert_eq!(n, 13.0, "returns the norm before clipping");
        let coef = 6.5 / (13.0 + 1e-6);
        let round = |v: f64| {
            if dtype == DType::F32 {
                v as f32 as f64
            } else {
                v
            }
        };
        let c = round(coef);
        assert_eq!(
            values(&a.grad().unwrap()),
            vec![round(round(3.0) * c), round(round(4.0) * c)]
        );
        assert_eq!(values(&b.grad().unwrap()), vec![round(12.0 * c)]);
        assert!(none.grad().is_none());
        let after = clip_grad_norm(&params, 1e9).unwrap();
        assert!((after - 13.0 * coef).abs() < 1e-5, "{after}");
    }
}

#[test]
fn clip_grad_norm_matches_torch() {
    let fx = fixture();
    let c = &fx["clip_grad_norm"];
    let step = c["grads_step"].as_u64().unwrap() as usize;
    let params: Vec<Tensor> = step_grads(&fx, step)
        .into_iter()
        .map(|g| param_with_grad(&g.unwrap(), DType::F64))
        .collect();
    let n = clip_grad_norm(&params, c["max_norm"].as_f64().unwrap()).unwrap();
    let want = c["total_norm"].as_f64().unwrap();
    assert!((n - want).abs() <= 1e-14 * want, "{n} vs torch {want}");
    for (p, w) in params.iter().zip(c["clipped"].as_array().unwrap()) {
        let err = max_rel_err(&values(&p.grad().unwrap()), &floats(w));
        assert!(err <= TOL_F64, "clipped grad error {err:e}");
    }
}

#[test]
fn clip_grad_norm_non_finite_leaves_grads_alone() {
    let a = param_with_grad(&[1.0, f64::INFINITY], DType::F64);
    let b = param_with_grad(&[5.0], DType::F64);
    let n = clip_grad_norm([&a, &b], 1.0).unwrap();
    assert!(n.is_infinite());
    assert_eq!(values(&b.grad().unwrap()), vec![5.0]);

    let c = param_with_grad(&[f64::NAN], DType::F32);
    let n = clip_grad_norm([&b, &c], 1.0).unwrap();
    assert!(n.is_nan());
    assert_eq!(values(&b.grad().unwrap()), vec![5.0]);

    assert!(clip_grad_norm([&b], f64::NAN).is_err());
    // No gradients at all: norm 0.
    let bare = Tensor::zeros(&[2], DType::F32).unwrap().requires_grad_();
    assert_eq!(clip_grad_norm([&bare], 1.0).unwrap(), 0.0);
}

#[test]
fn clip_grad_norm_broadcast_gradient() {
    // loss = sum(p): the gradient may be a broadcast view of a single 1.
    let p = Tensor::zeros(&[2, 8], DType::F32).unwrap().requires_grad_();
    p.sum_all().unwrap().backward().unwrap();
    let n = clip_grad_norm([&p], 2.0).unwrap();
    assert_eq!(n, 4.0);
    let c = (2.0 / (4.0 + 1e-6)) as f32 as f64;
    assert_eq!(values(&p.grad().unwrap()), vec![c; 16]);
}

// ------------------------------------------------------------------ schedules

#[test]
fn schedules_match_transformers() {
    let fx = fixture();
    let s = &fx["schedules"];
    let peak = s["peak_lr"].as_f64().unwrap();
    let min_lr = s["min_lr"].as_f64().unwrap();
    let warmup = s["warmup_steps"].as_u64().unwrap();
    let total = s["total_steps"].as_u64().unwrap();
    let cases = [
        (
            "cosine",
            LrSchedule::WarmupCosine {
                peak_lr: peak,
                min_lr: 0.0,
                warmup_steps: warmup,
                total_steps: total,
            },
        ),
        (
            "cosine_min_lr",
            LrSchedule::WarmupCosine {
                peak_lr: peak,
                min_lr,
                warmup_steps: warmup,
                total_steps: total,
            },
        ),
        (
            "linear",
            LrSchedule::WarmupLinear {
                peak_lr: peak,
                warmup_steps: warmup,
                total_steps: total,
            },
        ),
        (
            "constant_warmup",
            LrSchedule::WarmupConstant {
                lr: peak,
                warmup_steps: warmup,
            },
        ),
    ];
    for (name, sched) in cases {
        sched.validate().unwrap();
        let want = floats(&s[name]);
        for (step, w) in want.iter().enumerate() {
            let got = sched.lr_at(step as u64);
            assert!(
                (got - w).abs() <= 1e-15 * w.abs().max(1e-12),
                "{name} step {step}: {got} vs {w}"
            );
        }
    }
}

#[test]
fn schedule_edges() {
    let c = LrSchedule::Constant { lr: 3e-4 };
    assert_eq!(c.lr_at(0), 3e-4);
    assert_eq!(c.lr_at(1 << 40), 3e-4);
    let cos = LrSchedule::WarmupCosine {
        peak_lr: 1.0,
        min_lr: 0.1,
        warmup_steps: 0,
        total_steps: 4,
    };
    assert_eq!(
        cos.lr_at(0),
        1.0,
        "no warmup: the first step has the peak lr"
    );
    assert!((cos.lr_at(2) - 0.55).abs() < 1e-15);
    // Past the end: stays at min_lr (transformers' cosine would rise again).
    for s in [4, 5, 7, 100] {
        assert!((cos.lr_at(s) - 0.1).abs() < 1e-15, "step {s}");
    }
    let lin = LrSchedule::WarmupLinear {
        peak_lr: 2.0,
        warmup_steps: 2,
        total_steps: 6,
    };
    assert_eq!(
        (0..9).map(|s| lin.lr_at(s)).collect::<Vec<_>>(),
        vec![0.0, 1.0, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0, 0.0]
    );
    assert!(LrSchedule::WarmupLinear {
        peak_lr: 1.0,
        warmup_steps: 7,
        total_steps: 6
    }
    .validate()
    .is_err());
    assert!(LrSchedule::WarmupCosine {
        peak_lr: 1.0,
        min_lr: 2.0,
        warmup_steps: 0,
        total_steps: 6
    }
    .validate()
    .is_err());
    assert!(LrSchedule::Constant { lr: f64::NAN }.validate().is_err());
}

/// `Tensor::cast_from_copy` passes the gradient back to the source as `to_dtype` does, and
/// rejects a copy of another shape; `AdamW::compute_params` on CPU parameters is a plain cast
/// whose gradient reaches the masters.
#[test]
fn compute_casts_reach_the_masters() -> Result<()> {
    let p = Tensor::from_vec(vec![1.5f32, -2.0, 0.25, 3.0], &[2, 2])?.requires_grad_();
    let copy = tessera::no_grad(|| p.detach().to_dtype(DType::BF16))?;
    let y = p.cast_from_copy(&copy)?;
    assert_eq!(y.dtype(), DType::BF16);
    let w = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2])?;
    y.to_dtype(DType::F32)?.mul(&w)?.sum_all()?.backward()?;
    assert_eq!(p.grad().unwrap().to_vec::<f32>()?, vec![1.0, 2.0, 3.0, 4.0]);
    let other = Tensor::zeros(&[4], DType::BF16)?;
    let e = p.cast_from_copy(&other).unwrap_err().to_string();
    assert!(e.contains("cast_from_copy"), "{e}");

    let q = Tensor::from_vec(vec![0.5f32, -1.0], &[2])?.requires_grad_();
    let mut opt = AdamW::new(vec![q.clone()], AdamWConfig::default())?;
    let c = opt.compute_params(DType::F32)?;
    c[0].mul(&Tensor::from_vec(vec![3.0f32, 5.0], &[2])?)?
        .sum_all()?
        .backward()?;
    assert_eq!(q.grad().unwrap().to_vec::<f32>()?, vec![3.0, 5.0]);
    opt.step(0.1)?;
    assert!(q.to_vec::<f32>()?[0] < 0.5, "the step moved the master");
    Ok(())
}

/// A small graph that uses `ps` = [w1 [5, 7], b1 [7], w2 [7, 3]] several times each (w1 twice:
/// its gradient sums two contributions): sum((tanh(x w1 + b1) w2)²) + sum(w1 · w1 · c), all
/// in `ps`' dtype after a cast to f32 (so a bf16 copy works on the CPU too). Without b1 when
/// `skip_b1`.
fn leaves_loss(ps: &[Tensor], x: &Tensor, c: &Tensor, skip_b1: bool) -> Result<Tensor> {
    let f: Vec<Tensor> = ps
        .iter()
        .map(|p| p.to_dtype(DType::F32))
        .collect::<Result<_>>()?;
    let mut h = x.matmul(&f[0])?;
    if !skip_b1 {
        h = h.add(&f[1])?;
    }
    let y = h.tanh()?.matmul(&f[2])?;
    y.mul(&y)?
        .sum_all()?
        .add(&f[0].mul(&f[0])?.mul(c)?.sum_all()?)
}

/// `AdamW::compute_leaves`: gradients stay on the compute copies in their dtype, the step
/// reads them there, and the masters, moments and copies come out exactly as with
/// `compute_params` (cast nodes whose backward casts the gradient to the master's dtype):
/// f64 masters with f32 copies, and f32 masters with bf16 copies; a parameter without a
/// gradient at one step; a master with a gradient of its own beside its copy's; the same
/// leaves on every call; zero_grad clears them; load_state and a new dtype make new ones.
#[test]
fn compute_leaves_update_as_compute_params() -> Result<()> {
    for (master, compute) in [(DType::F64, DType::F32), (DType::F32, DType::BF16)] {
        let mut rng = tessera::Rng::new(11);
        let init: Vec<Tensor> = [vec![5, 7], vec![7], vec![7, 3]]
            .iter()
            .map(|s| Tensor::randn(s, 0.5, master, &mut rng))
            .collect::<Result<_>>()?;
        let fresh = |ps: &[Tensor]| -> Vec<Tensor> {
            ps.iter()
                .map(|p| {
                    let v = p.to_f64s().unwrap();
                    Tensor::from_f64s(&v, p.shape(), master)
                        .unwrap()
                        .requires_grad_()
                })
                .collect()
        };
        let (pa, pb) = (fresh(&init), fresh(&init));
        let x = Tensor::randn(&[4, 5], 1.0, DType::F32, &mut rng)?;
        let c = Tensor::randn(&[5, 7], 1.0, DType::F32, &mut rng)?;
        let mut oa = AdamW::new(pa.clone(), AdamWConfig::default())?;
        let mut ob = AdamW::new(pb.clone(), AdamWConfig::default())?;
        ob.set_multi_tensor(true); // CUDA only: CPU parameters are updated one by one anyway
        let mut leaves = ob.compute_leaves(compute)?;
        for step in 0..4 {
            let skip_b1 = step == 1;
            let casts = oa.compute_params(compute)?;
            leaves_loss(&casts, &x, &c, skip_b1)?.backward()?;
            let again = ob.compute_leaves(compute)?;
            for (l, a) in leaves.iter().zip(&again) {
                assert_eq!(l.id(), a.id(), "compute_leaves returns the same leaves");
            }
            leaves_loss(&leaves, &x, &c, skip_b1)?.backward()?;
            if step == 2 {
                // The master of w2 gets a gradient of its own too: the update uses the sum.
                let extra = Tensor::randn(&[7, 3], 1.0, master, &mut rng)?;
                pa[2].mul(&extra)?.sum_all()?.backward()?;
                pb[2].mul(&extra)?.sum_all()?.backward()?;
            }
            for (i, ((a, b), l)) in pa.iter().zip(&pb).zip(&leaves).enumerate() {
                assert_eq!(l.dtype(), compute);
                let (ga, gl) = (a.grad(), l.grad());
                assert_eq!(
                    ga.is_some(),
                    gl.is_some(),
                    "step {step}: param {i} has a gradient"
                );
                if let (Some(ga), Some(gl)) = (ga, gl) {
                    let gl = gl.to_dtype(master)?;
                    let gl = match b.grad() {
                        Some(gb) => gb.add(&gl)?,
                        None => gl,
                    };
                    assert_eq!(gl.to_f64s()?, ga.to_f64s()?, "step {step}: gradient {i}");
                }
            }
            oa.step(0.05)?;
            ob.step(0.05)?;
            for (i, ((a, b), l)) in pa.iter().zip(&pb).zip(&leaves).enumerate() {
                assert_eq!(a.to_f64s()?, b.to_f64s()?, "step {step}: master {i}");
                let cast = b.detach().to_dtype(compute)?.to_f64s()?;
                assert_eq!(
                    l.to_f64s()?,
                    cast,
                    "step {step}: copy {i} is the master's cast"
                );
            }
            let (sa, sb) = (oa.state()?, ob.state()?);
            for (i, (a, b)) in sa.params.iter().zip(&sb.params).enumerate() {
                let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                assert_eq!(a.step, b.step, "step {step}: param {i}'s count");
                assert_eq!(a.exp_avg_sq.to_f64s()?, b.exp_avg_sq.to_f64s()?);
            }
            oa.zero_grad();
            ob.zero_grad();
            assert!(
                leaves.iter().all(|l| l.grad().is_none()),
                "zero_grad clears the copies"
            );
        }
        assert_eq!(
            ob.state()?.params[1].as_ref().unwrap().step,
            3,
            "b1 skipped once"
        );

        // A new dtype, and load_state, give new leaves cast from the masters.
        let other = if compute == DType::F32 {
            DType::BF16
        } else {
            DType::F32
        };
        let l2 = ob.compute_leaves(other)?;
        assert_eq!(l2[0].dtype(), other);
        assert_eq!(l2[0].to_f64s()?, pb[0].detach().to_dtype(other)?.to_f64s()?);
        let state = ob.state()?;
        // A state that does not fit changes nothing, the copies included.
        let mut short = state.clone();
        short.params.pop();
        assert!(ob.load_state(&short).is_err());
        let kept = ob.compute_leaves(other)?;
        assert_eq!(
            kept[0].id(),
            l2[0].id(),
            "a failed load_state keeps the copies"
        );
        ob.load_state(&state)?;
        let l3 = ob.compute_leaves(other)?;
        assert_ne!(l3[0].id(), l2[0].id(), "load_state drops the copies");
        leaves = l3;
        assert!(leaves.iter().all(|l| l.requires_grad()));
    }
    let mut o = AdamW::new(
        vec![Tensor::zeros(&[2], DType::F32)?.requires_grad_()],
        AdamWConfig::default(),
    )?;
    let e = o.compute_leaves(DType::I64).unwrap_err().to_string();
    assert!(e.contains("compute_leaves"), "{e}");
    Ok(())
}
