//! Gradient checks (f64 finite differences) of matmul, linear and the fused model ops, and
//! forward checks of the fused ops against compositions of simple ops.

#![allow(clippy::cloned_ref_to_slice_refs)] // `&[x.clone()]` reads better in a table of checks

use tessera::ops::attention::AttentionOptions;
use tessera::testing::check_grad;
use tessera::{DType, Result, Rng, Tensor};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 1.0, DType::F64, &mut Rng::new(seed)).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_f64s().unwrap(), b.to_f64s().unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn matmul_all_layouts() {
    let a = randn(&[3, 4], 1);
    let b = randn(&[4, 5], 2);
    check_grad("matmul", &[a.clone(), b.clone()], |v| v[0].matmul(&v[1])).unwrap();
    // Transposed operands (NT, TN, TT) as views.
    check_grad("matmul_nt", &[a.clone(), randn(&[5, 4], 3)], |v| {
        v[0].matmul(&v[1].t()?)
    })
    .unwrap();
    check_grad("matmul_tn", &[randn(&[4, 3], 4), b.clone()], |v| {
        v[0].t()?.matmul(&v[1])
    })
    .unwrap();
    check_grad("matmul_tt", &[randn(&[4, 3], 5), randn(&[5, 4], 6)], |v| {
        v[0].t()?.matmul(&v[1].t()?)
    })
    .unwrap();
    // Batched, broadcast batch dims, and a 2-d right operand.
    check_grad("bmm", &[randn(&[2, 3, 4], 7), randn(&[2, 4, 2], 8)], |v| {
        v[0].matmul(&v[1])
    })
    .unwrap();
    check_grad(
        "bmm_bcast",
        &[randn(&[2, 1, 3, 4], 9), randn(&[3, 4, 2], 10)],
        |v| v[0].matmul(&v[1]),
    )
    .unwrap();
    check_grad(
        "bmm_2d",
        &[randn(&[2, 3, 4], 11), randn(&[4, 2], 12)],
        |v| v[0].matmul(&v[1]),
    )
    .unwrap();
}

#[test]
fn matmul_matches_naive_product() {
    let (m, k, n) = (37, 29, 41);
    let a = randn(&[m, k], 13);
    let b = randn(&[k, n], 14);
    let c = a.matmul(&b).unwrap().to_f64s().unwrap();
    let (av, bv) = (a.to_f64s().unwrap(), b.to_f64s().unwrap());
    for i in 0..m {
        for j in 0..n {
            let r: f64 = (0..k).map(|p| av[i * k + p] * bv[p * n + j]).sum();
            assert!((c[i * n + j] - r).abs() < 1e-10);
        }
    }
}

#[test]
fn linear_with_and_without_bias() {
    let x = randn(&[2, 3, 4], 20);
    let w = randn(&[5, 4], 21);
    let b = randn(&[5], 22);
    check_grad("linear", &[x.clone(), w.clone(), b], |v| {
        v[0].linear(&v[1], Some(&v[2]))
    })
    .unwrap();
    check_grad("linear_nobias", &[x, w.clone()], |v| {
        v[0].linear(&v[1], None)
    })
    .unwrap();
    check_grad("linear_t", &[randn(&[4, 3], 23), w], |v| {
        v[0].t()?.linear(&v[1], None)
    })
    .unwrap();
}

#[test]
fn rms_norm() {
    for (i, shape) in [&[6][..], &[3, 8], &[2, 3, 5]].iter().enumerate() {
        let d = *shape.last().unwrap();
        check_grad(
            "rms_norm",
            &[randn(shape, 30 + i as u64), randn(&[d], 40 + i as u64)],
            |v| v[0].rms_norm(&v[1], 1e-6),
        )
        .unwrap();
    }
    check_grad("rms_norm_t", &[randn(&[5, 3], 50), randn(&[5], 51)], |v| {
        v[0].t()?.rms_norm(&v[1], 1e-6)
    })
    .unwrap();
    // Against the composition x * rsqrt(mean(x^2) + eps) * w.
    let (x, w) = (randn(&[4, 7], 52), randn(&[7], 53));
    let fused = x.rms_norm(&w, 1e-5).unwrap();
    let composed = x
        .mul(
            &x.mul(&x)
                .unwrap()
                .mean(-1, true)
                .unwrap()
                .add_scalar(1e-5)
                .unwrap()
                .rsqrt()
                .unwrap(),
        )
        .unwrap()
        .mul(&w)
        .unwrap();
    assert!(max_abs_diff(&fused, &composed) < 1e-12);
}

fn cos_sin(shape: &[usize], seed: u64) -> (Tensor, Tensor) {
    let theta = randn(shape, seed);
    let c = Tensor::from_f64s(
        &theta
            .to_f64s()
            .unwrap()
            .iter()
            .map(|t| t.cos())
            .collect::<Vec<_>>(),
        shape,
        DType::F64,
    )
    .unwrap();
    let s = Tensor::from_f64s(
        &theta
            .to_f64s()
            .unwrap()
            .iter()
            .map(|t| t.sin())
            .collect::<Vec<_>>(),
        shape,
        DType::F64,
    )
    .unwrap();
    (c, s)
}

#[test]
fn rope() {
    // [B, H, T, D] against cos/sin [B, 1, T, D], and [T, H, D] against [T, 1, D].
    let (c, s) = cos_sin(&[2, 1, 3, 4], 60);
    check_grad("rope", &[randn(&[2, 3, 3, 4], 61)], |v| v[0].rope(&c, &s)).unwrap();
    let (c2, s2) = cos_sin(&[5, 1, 6], 62);
    check_grad("rope_vision", &[randn(&[5, 2, 6], 63)], |v| {
        v[0].rope(&c2, &s2)
    })
    .unwrap();
    // Non-contiguous input: [B, T, H, D] transposed to [B, H, T, D].
    check_grad("rope_t", &[randn(&[2, 3, 3, 4], 64)], |v| {
        v[0].transpose(1, 2)?.rope(&c, &s)
    })
    .unwrap();
    // Against x*cos + rotate_half(x)*sin.
    let x = randn(&[2, 3, 3, 4], 65);
    let h = x.split(&[2, 2], -1).unwrap();
    let rot = Tensor::cat(&[&h[1].neg().unwrap(), &h[0]], -1).unwrap();
    let composed = x.mul(&c).unwrap().add(&rot.mul(&s).unwrap()).unwrap();
    assert!(max_abs_diff(&x.rope(&c, &s).unwrap(), &composed) < 1e-12);
}

#[test]
fn swiglu_and_embedding() {
    check_grad("swiglu", &[randn(&[3, 5], 70), randn(&[3, 5], 71)], |v| {
        v[0].swiglu(&v[1])
    })
    .unwrap();
    let (g, u) = (randn(&[2, 6], 72), randn(&[2, 6], 73));
    assert!(max_abs_diff(&g.swiglu(&u).unwrap(), &g.silu().unwrap().mul(&u).unwrap()) < 1e-12);
    let ids = Tensor::from_vec(vec![3i64, 0, 3, 1, 2, 3], &[2, 3]).unwrap();
    check_grad("embedding", &[randn(&[4, 5], 74)], |v| {
        Tensor::embedding(&ids, &v[0])
    })
    .unwrap();
    let bad = Tensor::from_vec(vec![4i64], &[1]).unwrap();
    let e = Tensor::embedding(&bad, &randn(&[4, 5], 75))
        .unwrap_err()
        .to_string();
    assert!(e.contains("token id 4 >= vocabulary size 4"), "{e}");
}

/// Attention written with plain ops: softmax(QKᵀ·scale + mask) V, K/V repeated per group.
fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[bool],
    groups: usize,
) -> Result<Tensor> {
    let (b, hkv, tk, d) = (k.shape()[0], k.shape()[1], k.shape()[2], k.shape()[3]);
    let tq = q.shape()[2];
    let rep = |t: &Tensor| -> Result<Tensor> {
        let s = t.shape().to_vec();
        t.unsqueeze(2)?
            .broadcast_as(&[b, hkv, groups, tk, s[3]])?
            .reshape(&[b, hkv * groups, tk, s[3]])
    };
    let (k, v) = (rep(k)?, rep(v)?);
    let s = q.matmul(&k.t()?)?.mul_scalar(1.0 / (d as f64).sqrt())?;
    let m = Tensor::from_vec(
        mask.iter().map(|&x| !x as u32).collect::<Vec<_>>(),
        &[b, 1, tq, tk],
    )?;
    s.masked_fill(&m, -1e30)?.softmax(-1)?.matmul(&v)
}

#[test]
fn attention_matches_reference_and_gradchecks() {
    let (b, hq, hkv, t, d) = (2, 4, 2, 5, 3);
    let q = randn(&[b, hq, t, d], 80);
    let k = randn(&[b, hkv, t, d], 81);
    let v = randn(&[b, hkv, t, d], 82);
    let pad = Tensor::from_vec(vec![1i64, 1, 1, 1, 1, 0, 1, 1, 1, 1], &[b, t]).unwrap();
    let opts = AttentionOptions {
        causal: true,
        key_padding: Some(pad.clone()),
        ..Default::default()
    };
    let mut mask = vec![false; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..t {
                mask[(bi * t + i) * t + j] = j <= i && !(bi == 1 && j == 0);
            }
        }
    }
    // Row (b=1, i=0) sees no key: the fused op gives 0 there, the reference a uniform mix.
    let fused = Tensor::attention(&q, &k, &v, &opts).unwrap();
    let reference = attention_reference(&q, &k, &v, &mask, hq / hkv).unwrap();
    let (f, r) = (fused.to_f64s().unwrap(), reference.to_f64s().unwrap());
    for bi in 0..b {
        for h in 0..hq {
            for i in 0..t {
                for e in 0..d {
                    let idx = ((bi * hq + h) * t + i) * d + e;
                    if bi == 1 && i == 0 {
                        assert_eq!(f[idx], 0.0);
                    } else {
                        assert!((f[idx] - r[idx]).abs() < 1e-12, "{idx}");
                    }
                }
            }
        }
    }
    check_grad(
        "attention_causal_pad_gqa",
        &[q.clone(), k.clone(), v.clone()],
        |x| Tensor::attention(&x[0], &x[1], &x[2], &opts),
    )
    .unwrap();
    let plain = AttentionOptions::default();
    check_grad("attention_plain", &[q.clone(), k.clone(), v.clone()], |x| {
        Tensor::attention(&x[0], &x[1], &x[2], &plain)
    })
    .unwrap();
    // Non-contiguous q: [B, T, H, D] viewed as [B, H, T, D]; Dv != D; Tq < Tk.
    check_grad(
        "attention_views",
        &[
            randn(&[b, 2, hq, d], 83),
            k.clone(),
            randn(&[b, hkv, t, 4], 84),
        ],
        |x| {
            Tensor::attention(
                &x[0].transpose(1, 2)?,
                &x[1],
                &x[2],
                &AttentionOptions {
                    causal: true,
                    ..Default::default()
                },
            )
        },
    )
    .unwrap();
}

/// Sequences longer than the CPU attention's query tiles (64 rows; the backward tiles blocks
/// of more than 256): forward and all three gradients against the dense reference, causal
/// with Tq > Tk (whole tiles see no key) and Tq < Tk, key padding, and segments longer than a
/// tile, with and without causal; short blocks beside long ones.
#[test]
fn attention_tiles_match_dense_reference() {
    struct Case {
        tq: usize,
        tk: usize,
        causal: bool,
        pad: Option<usize>,
        cu: Option<Vec<usize>>,
    }
    #[rustfmt::skip]
    let cases = [
        Case { tq: 300, tk: 340, causal: true, pad: None, cu: None },
        Case { tq: 150, tk: 170, causal: true, pad: None, cu: None },
        Case { tq: 400, tk: 150, causal: true, pad: None, cu: None },
        Case { tq: 290, tk: 290, causal: true, pad: Some(270), cu: None },
        Case { tq: 331, tk: 331, causal: true, pad: None, cu: Some(vec![0, 70, 70, 330, 331]) },
        Case { tq: 331, tk: 331, causal: true, pad: Some(100), cu: Some(vec![0, 20, 300, 331]) },
        Case { tq: 331, tk: 331, causal: false, pad: None, cu: Some(vec![0, 5, 320, 331]) },
        Case { tq: 270, tk: 270, causal: false, pad: None, cu: None },
    ];
    let (b, hq, hkv, d) = (2, 4, 2, 8);
    for (n, c) in cases.iter().enumerate() {
        let seed = 300 + 10 * n as u64;
        let q = randn(&[b, hq, c.tq, d], seed).requires_grad_();
        let k = randn(&[b, hkv, c.tk, d], seed + 1).requires_grad_();
        let v = randn(&[b, hkv, c.tk, d], seed + 2).requires_grad_();
        let mut keep = vec![1i64; b * c.tk];
        if let Some(j) = c.pad {
            keep[c.tk + j] = 0;
        }
        let seg = |i: usize| match &c.cu {
            Some(cu) => cu.windows(2).position(|w| w[0] <= i && i < w[1]).unwrap(),
            None => 0,
        };
        let offset = c.tk as isize - c.tq as isize;
        let mut mask = vec![false; b * c.tq * c.tk];
        for bi in 0..b {
            for i in 0..c.tq {
                for j in 0..c.tk {
                    mask[(bi * c.tq + i) * c.tk + j] = (!c.causal
                        || j as isize <= i as isize + offset)
                        && seg(i) == seg(j)
                        && keep[bi * c.tk + j] != 0;
                }
            }
        }
        let opts = AttentionOptions {
            causal: c.causal,
            key_padding: c
                .pad
                .map(|_| Tensor::from_vec(keep.clone(), &[b, c.tk]).unwrap()),
            cu_seqlens: c.cu.clone(),
            ..Default::default()
        };
        // The upstream gradient is zero on rows that see no key (the fused op outputs zeros
        // there, the reference a uniform mix).
        let sees = |bi: usize, i: usize| (0..c.tk).any(|j| mask[(bi * c.tq + i) * c.tk + j]);
        let mut g = randn(&[b, hq, c.tq, d], seed + 3).to_f64s().unwrap();
        for (bi, h, i) in
            (0..b).flat_map(|bi| (0..hq).flat_map(move |h| (0..c.tq).map(move |i| (bi, h, i))))
        {
            if !sees(bi, i) {
                g[((bi * hq + h) * c.tq + i) * d..][..d]
                    .iter_mut()
                    .for_each(|e| *e = 0.0);
            }
        }
        let g = Tensor::from_vec(g, &[b, hq, c.tq, d]).unwrap();
        let fused = Tensor::attention(&q, &k, &v, &opts).unwrap();
        let reference = attention_reference(&q, &k, &v, &mask, hq / hkv).unwrap();
        let (f, r) = (fused.to_f64s().unwrap(), reference.to_f64s().unwrap());
        for (idx, (x, y)) in f.iter().zip(&r).enumerate() {
            let (bi, i) = (idx / (hq * c.tq * d), idx / d % c.tq);
            if sees(bi, i) {
                assert!((x - y).abs() < 1e-12, "case {n}: output {idx}: {x} vs {y}");
            } else {
                assert_eq!(*x, 0.0, "case {n}: output {idx} of a row that sees no key");
            }
        }
        let gf = tessera::grad(&fused, Some(&g), &[&q, &k, &v]).unwrap();
        let gr = tessera::grad(&reference, Some(&g), &[&q, &k, &v]).unwrap();
        for (which, (a, e)) in ["dq", "dk", "dv"].iter().zip(gf.iter().zip(&gr)) {
            let (a, e) = (a.as_ref().unwrap(), e.as_ref().unwrap());
            let err = max_abs_diff(a, e);
            assert!(err < 1e-10, "case {n}: {which} differs by {err}");
        }
    }
}

#[test]
fn attention_segments_with_causal_padding_and_gqa() {
    // Segments [0, 3) [3, 3) [3, 6) [6, 7) (one empty), causal, a padded key, 4 query heads
    // on 2 kv heads: equals the dense reference with the combined mask, and gradchecks.
    let (b, hq, hkv, t, d) = (2, 4, 2, 7, 3);
    let q = randn(&[b, hq, t, d], 93);
    let k = randn(&[b, hkv, t, d], 94);
    let v = randn(&[b, hkv, t, d], 95);
    let cu = vec![0, 3, 3, 6, 7];
    let seg = |i: usize| cu.windows(2).position(|w| w[0] <= i && i < w[1]).unwrap();
    let mut keep = vec![1i64; b * t];
    keep[t + 4] = 0;
    let pad = Tensor::from_vec(keep.clone(), &[b, t]).unwrap();
    let opts = AttentionOptions {
        causal: true,
        key_padding: Some(pad),
        cu_seqlens: Some(cu.clone()),
        ..Default::default()
    };
    let mut mask = vec![false; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..t {
                mask[(bi * t + i) * t + j] = j <= i && seg(i) == seg(j) && keep[bi * t + j] != 0;
            }
        }
    }
    // Key (1, 4) is padded; its own row still sees key 3 of its segment.
    let fused = Tensor::attention(&q, &k, &v, &opts).unwrap();
    let reference = attention_reference(&q, &k, &v, &mask, hq / hkv).unwrap();
    assert!(max_abs_diff(&fused, &reference) < 1e-12);
    check_grad(
        "attention_segments_causal_pad_gqa",
        &[q.clone(), k.clone(), v.clone()],
        |x| Tensor::attention(&x[0], &x[1], &x[2], &opts),
    )
    .unwrap();
    // The same without the padded key: the path where each row's visible keys are a prefix
    // of its segment's block.
    let opts = AttentionOptions {
        key_padding: None,
        ..opts
    };
    for (bi, i, j) in
        (0..b).flat_map(|bi| (0..t).flat_map(move |i| (0..t).map(move |j| (bi, i, j))))
    {
        mask[(bi * t + i) * t + j] = j <= i && seg(i) == seg(j);
    }
    let fused = Tensor::attention(&q, &k, &v, &opts).unwrap();
    let reference = attention_reference(&q, &k, &v, &mask, hq / hkv).unwrap();
    assert!(max_abs_diff(&fused, &reference) < 1e-12);
    check_grad("attention_segments_causal_gqa", &[q, k, v], |x| {
        Tensor::attention(&x[0], &x[1], &x[2], &opts)
    })
    .unwrap();
}

#[test]
fn attention_segments() {
    // cu_seqlens [0, 2, 5]: two windows; equals attention run separately on each segment.
    let q = randn(&[1, 2, 5, 4], 90);
    let k = randn(&[1, 2, 5, 4], 91);
    let v = randn(&[1, 2, 5, 4], 92);
    let opts = AttentionOptions {
        cu_seqlens: Some(vec![0, 2, 5]),
        ..Default::default()
    };
    let seg = Tensor::attention(&q, &k, &v, &opts).unwrap();
    let plain = AttentionOptions::default();
    for (s, l) in [(0, 2), (2, 3)] {
        let part = Tensor::attention(
            &q.narrow(2, s, l).unwrap(),
            &k.narrow(2, s, l).unwrap(),
            &v.narrow(2, s, l).unwrap(),
            &plain,
        )
        .unwrap();
        assert!(max_abs_diff(&seg.narrow(2, s, l).unwrap(), &part) < 1e-12);
    }
    check_grad("attention_segments", &[q, k, v], |x| {
        Tensor::attention(&x[0], &x[1], &x[2], &opts)
    })
    .unwrap();
    let bad = AttentionOptions {
        cu_seqlens: Some(vec![0, 7]),
        ..Default::default()
    };
    assert!(Tensor::attention(
        &randn(&[1, 1, 5, 2], 1),
        &randn(&[1, 1, 5, 2], 2),
        &randn(&[1, 1, 5, 2], 3),
        &bad
    )
    .is_err());
}

#[test]
fn cross_entropy_and_log_probs() {
    let logits = randn(&[2, 3, 7], 100);
    let targets = Tensor::from_vec(vec![1i64, -100, 6, 0, 3, -100], &[2, 3]).unwrap();
    check_grad("cross_entropy", &[logits.clone()], |v| {
        v[0].cross_entropy(&targets, -100)
    })
    .unwrap();
    // Against -mean(log_softmax[target]) over counted tokens.
    let ce = logits
        .cross_entropy(&targets, -100)
        .unwrap()
        .to_scalar()
        .unwrap();
    let ls = logits.log_softmax(-1).unwrap().to_f64s().unwrap();
    let t = [1, -100, 6, 0, 3, -100];
    let manual: f64 = t
        .iter()
        .enumerate()
        .filter(|(_, &x)| x >= 0)
        .map(|(r, &x)| -ls[r * 7 + x as usize])
        .sum::<f64>()
        / 4.0;
    assert!((ce - manual).abs() < 1e-12);
    let ids = Tensor::from_vec(vec![1i64, 2, 6, 0, 3, 5], &[2, 3]).unwrap();
    check_grad("log_prob_of", &[logits.clone()], |v| v[0].log_prob_of(&ids)).unwrap();
    check_grad("log_prob_of_t", &[randn(&[7, 2], 101)], |v| {
        v[0].t()?
            .log_prob_of(&Tensor::from_vec(vec![3i64, 4], &[2])?)
    })
    .unwrap();
    let lp = logits.log_prob_of(&ids).unwrap().to_f64s().unwrap();
    assert!((lp[2] - ls[2 * 7 + 6]).abs() < 1e-12);
    // All ignored: loss 0, gradient 0.
    let none = Tensor::full(&[2, 3], -100.0, DType::I64).unwrap();
    assert_eq!(
        logits
            .cross_entropy(&none, -100)
            .unwrap()
            .to_scalar()
            .unwrap(),
        0.0
    );
    let bad = Tensor::from_vec(vec![7i64, 0, 0, 0, 0, 0], &[2, 3]).unwrap();
    let e = logits.cross_entropy(&bad, -100).unwrap_err().to_string();
    assert!(e.contains("target id 7 outside"), "{e}");
}
