//! Finite-difference gradient checks of the elementwise, reduction, shape and index ops, on
//! several shapes each, with broadcasting and non-contiguous views.

#![allow(clippy::cloned_ref_to_slice_refs)] // `&[x.clone()]` reads better in a table of checks

use tessera::testing::{check_grad, GradCheck};
use tessera::{DType, Result, Rng, Tensor};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 1.0, DType::F64, &mut Rng::new(seed)).unwrap()
}

/// Values in (lo, hi): for log/sqrt/pow domains.
fn rand_in(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    Tensor::rand(shape, lo, hi, DType::F64, &mut Rng::new(seed)).unwrap()
}

const SHAPES: &[&[usize]] = &[&[5], &[3, 4], &[2, 3, 4]];

fn unary(name: &str, f: fn(&Tensor) -> Result<Tensor>, positive: bool) {
    for (s, shape) in SHAPES.iter().enumerate() {
        let x = if positive {
            rand_in(shape, 0.5, 2.0, s as u64)
        } else {
            randn(shape, s as u64)
        };
        check_grad(name, &[x], |v| f(&v[0])).unwrap();
    }
    // Non-contiguous input: a transposed view.
    let x = if positive {
        rand_in(&[4, 3], 0.5, 2.0, 9)
    } else {
        randn(&[4, 3], 9)
    };
    check_grad(name, &[x], |v| f(&v[0].t()?)).unwrap();
}

#[test]
fn unary_ops() {
    unary("neg", |x| x.neg(), false);
    unary("affine", |x| x.affine(-1.5, 0.25), false);
    unary("exp", |x| x.exp(), false);
    unary("log", |x| x.log(), true);
    unary("sqrt", |x| x.sqrt(), true);
    unary("rsqrt", |x| x.rsqrt(), true);
    unary("powf", |x| x.powf(2.5), true);
    unary("abs", |x| x.abs(), false);
    unary("clamp", |x| x.clamp(-0.5, 0.7), false);
    unary("sigmoid", |x| x.sigmoid(), false);
    unary("tanh", |x| x.tanh(), false);
    unary("silu", |x| x.silu(), false);
    unary("gelu", |x| x.gelu(), false);
}

#[test]
fn binary_ops_with_broadcasting() {
    let pairs: &[(&[usize], &[usize])] = &[
        (&[3, 4], &[3, 4]),
        (&[2, 3, 4], &[4]),
        (&[2, 1, 4], &[3, 1]),
        (&[1], &[2, 3]),
    ];
    for (i, (sa, sb)) in pairs.iter().enumerate() {
        let a = randn(sa, 10 + i as u64);
        let b = rand_in(sb, 0.5, 2.0, 20 + i as u64);
        check_grad("add", &[a.clone(), b.clone()], |v| v[0].add(&v[1])).unwrap();
        check_grad("sub", &[a.clone(), b.clone()], |v| v[0].sub(&v[1])).unwrap();
        check_grad("mul", &[a.clone(), b.clone()], |v| v[0].mul(&v[1])).unwrap();
        check_grad("div", &[a.clone(), b.clone()], |v| v[0].div(&v[1])).unwrap();
    }
    // Non-contiguous operands.
    let a = randn(&[4, 3], 30);
    let b = randn(&[3, 4], 31);
    check_grad("mul_t", &[a, b], |v| v[0].t()?.mul(&v[1])).unwrap();
}

#[test]
fn reductions() {
    let x = randn(&[2, 3, 4], 40);
    check_grad("sum_all", &[x.clone()], |v| v[0].sum_all()).unwrap();
    check_grad("sum_dims", &[x.clone()], |v| v[0].sum_dims(&[0, 2], false)).unwrap();
    check_grad("sum_keep", &[x.clone()], |v| v[0].sum(1, true)).unwrap();
    check_grad("mean", &[x.clone()], |v| v[0].mean(-1, false)).unwrap();
    check_grad("mean_all", &[x.clone()], |v| v[0].mean_all()).unwrap();
    check_grad("max", &[x.clone()], |v| v[0].max(1, false)).unwrap();
    check_grad("max_keep", &[x.clone()], |v| v[0].max(-1, true)).unwrap();
    check_grad("logsumexp", &[x.clone()], |v| v[0].logsumexp(2, false)).unwrap();
    check_grad("logsumexp0", &[x.clone()], |v| v[0].logsumexp(0, true)).unwrap();
    check_grad("softmax", &[x.clone()], |v| v[0].softmax(-1)).unwrap();
    check_grad("softmax1", &[x.clone()], |v| v[0].softmax(1)).unwrap();
    check_grad("log_softmax", &[x.clone()], |v| v[0].log_softmax(-1)).unwrap();
    check_grad("log_softmax0", &[x.clone()], |v| v[0].log_softmax(0)).unwrap();
    check_grad("sum_t", &[x.clone()], |v| {
        v[0].transpose(0, 2)?.sum(0, false)
    })
    .unwrap();
    check_grad("softmax_t", &[x], |v| v[0].transpose(1, 2)?.softmax(-1)).unwrap();
}

#[test]
fn shape_ops() {
    let x = randn(&[2, 3, 4], 50);
    check_grad("reshape", &[x.clone()], |v| v[0].reshape(&[6, 4])?.exp()).unwrap();
    check_grad("reshape_t", &[x.clone()], |v| {
        v[0].transpose(0, 1)?.reshape(&[3, 8])?.exp()
    })
    .unwrap();
    check_grad("permute", &[x.clone()], |v| {
        v[0].permute(&[2, 0, 1])?.contiguous()
    })
    .unwrap();
    check_grad("narrow", &[x.clone()], |v| v[0].narrow(2, 1, 2)?.exp()).unwrap();
    check_grad("narrow0", &[x.clone()], |v| v[0].narrow(0, 1, 1)).unwrap();
    check_grad("split", &[x.clone()], |v| {
        let p = v[0].split(&[1, 2, 1], -1)?;
        p[0].mul(&p[2])?.add(&p[1].sum(-1, true)?)
    })
    .unwrap();
    // One piece unused (its gradient is zeros), one used twice, a split of a split.
    check_grad("split_partial", &[x.clone()], |v| {
        let p = v[0].split(&[2, 1, 1], 2)?;
        let q = p[0].split(&[2, 1], 1)?;
        q[0].exp()?
            .sum_all()?
            .add(&q[1].mul(&q[1])?.sum_all()?)?
            .add(&p[2].exp()?.mul(&p[2])?.sum_all()?)
    })
    .unwrap();
    check_grad("broadcast", &[randn(&[3, 1], 51)], |v| {
        v[0].broadcast_as(&[2, 3, 4])?.exp()
    })
    .unwrap();
    check_grad("squeeze", &[randn(&[3, 1, 2], 52)], |v| {
        v[0].squeeze(1)?.unsqueeze(0)?.exp()
    })
    .unwrap();
    // Through f32: finite differences need a coarser step.
    let coarse = GradCheck {
        eps: 1e-3,
        atol: 1e-3,
        rtol: 1e-2,
        ..GradCheck::default()
    };
    coarse
        .check("to_dtype", &[x], |v| {
            v[0].to_dtype(DType::F32)?.exp()?.to_dtype(DType::F64)
        })
        .unwrap();
}

#[test]
fn index_ops() {
    let a = randn(&[2, 3], 60);
    let b = randn(&[2, 5], 61);
    check_grad("cat", &[a.clone(), b.clone()], |v| {
        Tensor::cat(&[&v[0], &v[1]], 1)?.exp()
    })
    .unwrap();
    check_grad("cat0", &[a.clone(), randn(&[4, 3], 62)], |v| {
        Tensor::cat(&[&v[0], &v[1].t()?.t()?], 0)
    })
    .unwrap();
    check_grad("stack", &[a.clone(), randn(&[2, 3], 63)], |v| {
        Tensor::stack(&[&v[0], &v[1]], 1)
    })
    .unwrap();
    check_grad("zero_pad", &[a.clone()], |v| {
        v[0].t()?.zero_pad(1, 1, 3)?.exp()
    })
    .unwrap();
    // The same values, bit for bit, as cat with zero tensors (narrow's backward before it).
    let x = randn(&[4, 3, 5], 64).to_dtype(DType::BF16).unwrap();
    let z = |n: usize| Tensor::zeros(&[4, n, 5], DType::BF16).unwrap();
    let want = Tensor::cat(&[&z(2), &x, &z(1)], 1).unwrap();
    let got = x.zero_pad(1, 2, 1).unwrap();
    assert_eq!(got.shape(), want.shape());
    assert_eq!(
        got.to_vec::<half::bf16>().unwrap(),
        want.to_vec::<half::bf16>().unwrap()
    );
    let idx = Tensor::from_vec(vec![2i64, 0, 2, 1], &[4]).unwrap();
    check_grad("index_select", &[a.clone()], |v| v[0].index_select(&idx, 1)).unwrap();
    check_grad("index_select_t", &[a.clone()], |v| {
        v[0].t()?.index_select(&idx, 0)
    })
    .unwrap();
    let gidx = Tensor::from_vec(vec![4i64, 0, 0, 1, 3, 3], &[2, 3]).unwrap();
    check_grad("gather", &[b.clone()], |v| v[0].gather(&gidx, 1)).unwrap();
    let mask = Tensor::from_vec(vec![1u32, 0, 1], &[3]).unwrap();
    check_grad("where", &[a.clone(), randn(&[1, 3], 64)], |v| {
        Tensor::where_cond(&mask, &v[0], &v[1])
    })
    .unwrap();
    check_grad("masked_fill", &[a.clone()], |v| {
        v[0].masked_fill(&mask, -3.0)?.exp()
    })
    .unwrap();
    let smask = Tensor::from_vec(vec![0u32, 1, 1, 0, 1, 0], &[2, 3]).unwrap();
    check_grad("masked_scatter", &[a, randn(&[4], 65)], |v| {
        v[0].masked_scatter(&smask, &v[1])
    })
    .unwrap();
}

#[test]
fn index_errors_are_clear() {
    let a = randn(&[2, 3], 70);
    let bad = Tensor::from_vec(vec![3i64], &[1]).unwrap();
    let e = a.index_select(&bad, 1).unwrap_err().to_string();
    assert!(e.contains("index 3 out of range"), "{e}");
    let src = randn(&[1], 71);
    let mask = Tensor::ones(&[2, 3], DType::U32).unwrap();
    let e = a.masked_scatter(&mask, &src).unwrap_err().to_string();
    assert!(e.contains("selects 6 elements"), "{e}");
}
