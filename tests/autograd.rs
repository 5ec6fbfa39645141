//! Autograd semantics: accumulation, backward with an upstream gradient, gradients for a
//! subset of leaves, no_grad, detach, and errors instead of panics.

use tessera::{grad, no_grad, DType, Rng, Tensor};

fn param(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_f64s(v, shape, DType::F64)
        .unwrap()
        .requires_grad_()
}

#[test]
fn gradients_accumulate_until_zeroed() {
    let x = param(&[1.0, 2.0, 3.0], &[3]);
    let loss = || x.mul(&x).unwrap().sum_all().unwrap(); // d/dx = 2x
    loss().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_f64s().unwrap(), vec![2.0, 4.0, 6.0]);
    loss().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_f64s().unwrap(), vec![4.0, 8.0, 12.0]);
    x.zero_grad();
    assert!(x.grad().is_none());
    loss().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_f64s().unwrap(), vec![2.0, 4.0, 6.0]);
}

#[test]
fn backward_with_upstream_gradient() {
    let x = param(&[1.0, -2.0], &[2]);
    let y = x.mul_scalar(3.0).unwrap();
    let up = Tensor::from_f64s(&[10.0, 100.0], &[2], DType::F64).unwrap();
    y.backward_with(&up).unwrap();
    assert_eq!(x.grad().unwrap().to_f64s().unwrap(), vec![30.0, 300.0]);
    // A non-scalar without an upstream gradient is an error, not a panic.
    let y = x.mul_scalar(3.0).unwrap();
    assert!(y.backward().is_err());
    let wrong = Tensor::ones(&[3], DType::F64).unwrap();
    assert!(x.mul_scalar(2.0).unwrap().backward_with(&wrong).is_err());
}

#[test]
fn shared_subexpressions_sum_their_gradients() {
    // y = a*b + a ; dy/da = b + 1, dy/db = a
    let a = param(&[2.0], &[1]);
    let b = param(&[5.0], &[1]);
    let y = a.mul(&b).unwrap().add(&a).unwrap().sum_all().unwrap();
    y.backward().unwrap();
    assert_eq!(a.grad().unwrap().to_f64s().unwrap(), vec![6.0]);
    assert_eq!(b.grad().unwrap().to_f64s().unwrap(), vec![2.0]);
}

#[test]
fn grad_of_a_subset_of_leaves_leaves_dot_grad_alone() {
    let a = param(&[1.0, 2.0], &[2]);
    let b = param(&[3.0, 4.0], &[2]);
    let c = param(&[9.0], &[1]);
    let y = a.mul(&b).unwrap().sum_all().unwrap();
    let g = grad(&y, None, &[&b, &c]).unwrap();
    assert_eq!(g[0].as_ref().unwrap().to_f64s().unwrap(), vec![1.0, 2.0]);
    assert!(g[1].is_none(), "c does not influence y");
    assert!(a.grad().is_none() && b.grad().is_none());
}

#[test]
fn no_grad_and_detach_cut_the_graph() {
    let x = param(&[1.0], &[1]);
    let y = no_grad(|| x.mul_scalar(2.0).unwrap());
    assert!(!y.requires_grad());
    assert!(y.backward().is_err());
    let z = x
        .mul_scalar(2.0)
        .unwrap()
        .detach()
        .mul(&x)
        .unwrap()
        .sum_all()
        .unwrap();
    z.backward().unwrap();
    // Only the direct path through `x` counts: d(2x_detached * x)/dx = 2x = 2.
    assert_eq!(x.grad().unwrap().to_f64s().unwrap(), vec![2.0]);
}

#[test]
fn a_second_backward_through_a_freed_graph_is_an_error() {
    let x = param(&[1.0, 2.0], &[2]);
    let y = x.exp().unwrap().sum_all().unwrap();
    y.backward().unwrap();
    let e = y.backward().unwrap_err().to_string();
    assert!(e.contains("already freed"), "{e}");
}

#[test]
fn views_share_storage_and_in_place_writes_are_visible() {
    let mut rng = Rng::new(5);
    let x = Tensor::randn(&[3, 4], 1.0, DType::F32, &mut rng).unwrap();
    let t = x.t().unwrap();
    assert!(t.same_storage(&x) && !t.is_contiguous());
    x.write::<f32, _>(|d| d[1] = 42.0).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap()[3], 42.0); // t[1][0] == x[0][1]
    let n = x.narrow(1, 1, 2).unwrap();
    assert!(n.same_storage(&x));
    assert_eq!(n.to_vec::<f32>().unwrap()[0], 42.0);
}

#[test]
fn dtypes_cast_and_round_trip() {
    let v = vec![1.5f64, -2.25, 3.0, 65504.0];
    for dt in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let t = Tensor::from_f64s(&v, &[4], dt).unwrap();
        assert_eq!(
            t.to_dtype(DType::F64).unwrap().to_f64s().unwrap()[..3],
            v[..3],
            "{dt}"
        );
    }
    let ids = Tensor::arange(0.0, 5.0, 1.0, DType::I64).unwrap();
    assert_eq!(ids.to_vec::<i64>().unwrap(), vec![0, 1, 2, 3, 4]);
    assert_eq!(
        ids.to_dtype(DType::U32).unwrap().to_vec::<u32>().unwrap(),
        vec![0, 1, 2, 3, 4]
    );
    let b = Tensor::from_f64s(&[1.0 / 3.0], &[1], DType::F32)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(
        b.to_vec::<half::bf16>().unwrap()[0],
        half::bf16::from_f32(1.0 / 3.0)
    );
    // Ops need a compute dtype: a clear error, not a panic.
    let e = ids.exp().unwrap_err().to_string();
    assert!(e.contains("exp") && e.contains("i64"), "{e}");
}

#[test]
fn seeded_randomness_is_reproducible() {
    let a = Tensor::randn(&[16], 1.0, DType::F32, &mut Rng::new(11)).unwrap();
    let b = Tensor::randn(&[16], 1.0, DType::F32, &mut Rng::new(11)).unwrap();
    assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    let c = Tensor::randn(&[16], 1.0, DType::F32, &mut Rng::new(12)).unwrap();
    assert_ne!(a.to_vec::<f32>().unwrap(), c.to_vec::<f32>().unwrap());
}

/// Activation checkpointing gives the gradients of the plain graph (to rounding: the sums of a
/// tensor's gradient contributions associate differently): inputs,
/// params, two outputs of which one feeds the other's consumer, an output without a gradient,
/// and a chain of two checkpoints. A tensor needing gradients captured by the function (not
/// passed) is an error at the backward, not a silently missing gradient.
#[test]
fn checkpoint_gives_the_plain_gradients() {
    use tessera::autograd::checkpoint;
    let mut rng = Rng::new(3);
    let mk = |rng: &mut Rng, shape: &[usize]| {
        Tensor::randn(shape, 1.0, DType::F64, rng)
            .unwrap()
            .requires_grad_()
    };
    let (x, w1, w2) = (
        mk(&mut rng, &[4, 5]),
        mk(&mut rng, &[5, 5]),
        mk(&mut rng, &[5]),
    );
    let block = |xs: &[Tensor], ps: &[Tensor]| -> tessera::Result<Vec<Tensor>> {
        let h = xs[0].matmul(&ps[0])?.tanh()?;
        let y = h.mul(&ps[1])?.exp()?;
        Ok(vec![h, y, xs[0].mul_scalar(2.0)?])
    };
    let loss_of = |outs: &[Tensor]| -> Tensor {
        let (h, y) = (&outs[0], &outs[1]);
        h.sum_all()
            .unwrap()
            .add(&y.mul(h).unwrap().sum_all().unwrap())
            .unwrap()
    };
    let run = |ckpt: bool| -> Vec<Vec<f64>> {
        for t in [&x, &w1, &w2] {
            t.zero_grad();
        }
        let (a, b) = if ckpt {
            let a = checkpoint(&[&x], &[&w1, &w2], block).unwrap();
            let b = checkpoint(&[&a[1]], &[&w1, &w2], block).unwrap();
            (a, b)
        } else {
            let p = [w1.clone(), w2.clone()];
            let a = block(std::slice::from_ref(&x), &p).unwrap();
            let b = block(&[a[1].clone()], &p).unwrap();
            (a, b)
        };
        loss_of(&a).add(&loss_of(&b)).unwrap().backward().unwrap();
        [&x, &w1, &w2]
            .iter()
            .map(|t| t.grad().unwrap().to_f64s().unwrap())
            .collect()
    };
    for (a, b) in run(true).iter().flatten().zip(run(false).iter().flatten()) {
        assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
    }

    let captured = w1.clone();
    let outs = checkpoint(&[&x], &[&w2], move |xs, ps| {
        Ok(vec![xs[0].matmul(&captured)?.mul(&ps[0])?])
    })
    .unwrap();
    let err = outs[0]
        .sum_all()
        .unwrap()
        .backward()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("neither among its inputs nor its params"),
        "{err}"
    );
}

/// A node keeps the part of the model it was recorded in (`autograd::part`, the CUDA profile's
/// attribution), and its backward runs in that part, marked as a backward; the part is restored
/// when its guard drops.
#[test]
fn backward_runs_in_the_part_that_recorded_it() {
    use std::sync::{Arc, Mutex};
    use tessera::autograd::{current_part, part, record};
    let x = param(&[1.0, 2.0], &[2]);
    type Seen = Arc<Mutex<Vec<(Option<&'static str>, bool)>>>;
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let probe = |t: &Tensor, seen: &Seen| {
        let seen = seen.clone();
        record("probe", t.detach(), &[t], move |g| {
            seen.lock().unwrap().push(current_part());
            Ok(vec![Some(g.clone())])
        })
    };
    let y = {
        let _p = part("text mlp");
        assert_eq!(current_part(), (Some("text mlp"), false));
        let a = probe(&x, &seen);
        let _q = part("lm head and loss");
        probe(&a, &seen)
    };
    assert_eq!(current_part(), (None, false), "restored on drop");
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(Some("lm head and loss"), true), (Some("text mlp"), true)]
    );
    assert_eq!(current_part(), (None, false), "restored after the backward");
    assert_eq!(x.grad().unwrap().to_f64s().unwrap(), vec![1.0, 1.0]);
}
