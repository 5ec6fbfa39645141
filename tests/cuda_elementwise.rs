//! CUDA elementwise ops and reductions against the CPU backend (f32 and bf16, forward and
//! every input gradient): every unary op, every binary op with broadcasting both ways,
//! scalar-shaped and non-contiguous inputs, sum/mean/max/logsumexp over one, several and all
//! dims, softmax/log_softmax on rows of 7, 1000 and 151936 along the last dim and dim 0.
//! Each check prints a skip message and passes when no GPU is present.

use tessera::testing::cuda::{assert_close_to_cpu, randn, tol};
use tessera::{DType, Result, Tensor};

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

/// Compares `f` on CUDA with the CPU for both dtypes, gradients of every input.
fn check(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let grad_of = vec![true; inputs.len()];
    for dtype in DTYPES {
        if !assert_close_to_cpu(name, inputs, &grad_of, dtype, tol(dtype), &f) {
            return;
        }
    }
}

/// `check` with an explicit f32 tolerance (bf16 keeps its 1e-2): for sums over ~150k f32
/// values, where the CPU reference itself (8 sequential accumulators) is off by ~1e-5 of the
/// result.
fn check_f32_tol(
    name: &str,
    inputs: &[Tensor],
    f32_tol: f64,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let grad_of = vec![true; inputs.len()];
    for dtype in DTYPES {
        let t = if dtype == DType::F32 {
            f32_tol
        } else {
            tol(dtype)
        };
        if !assert_close_to_cpu(name, inputs, &grad_of, dtype, t, &f) {
            return;
        }
    }
}

/// Random values in [0.5, ∞) (log, sqrt, rsqrt, fractional powers, divisors).
fn pos(shape: &[usize], seed: u64) -> Tensor {
    randn(shape, seed).abs().unwrap().add_scalar(0.5).unwrap()
}

type Unary = fn(&Tensor) -> Result<Tensor>;

/// (name, needs positive input, op)
const UNARY: [(&str, bool, Unary); 16] = [
    ("neg", false, |t| t.neg()),
    ("affine", false, |t| t.affine(1.7, -0.3)),
    ("add_scalar", false, |t| t.add_scalar(2.5)),
    ("mul_scalar", false, |t| t.mul_scalar(-0.75)),
    ("exp", false, |t| t.exp()),
    ("log", true, |t| t.log()),
    ("sqrt", true, |t| t.sqrt()),
    ("rsqrt", true, |t| t.rsqrt()),
    ("powf 2.5", true, |t| t.powf(2.5)),
    ("powf 3", false, |t| t.powf(3.0)),
    ("abs", false, |t| t.abs()),
    ("clamp", false, |t| t.clamp(-0.5, 0.7)),
    ("sigmoid", false, |t| t.sigmoid()),
    ("tanh", false, |t| t.tanh()),
    ("silu", false, |t| t.silu()),
    ("gelu", false, |t| t.gelu()),
];

fn input(shape: &[usize], positive: bool, seed: u64) -> Tensor {
    if positive {
        pos(shape, seed)
    } else {
        randn(shape, seed)
    }
}

#[test]
fn unary_ops() {
    for (i, (name, positive, f)) in UNARY.into_iter().enumerate() {
        let seed = 100 + i as u64;
        // 111 elements: 16-byte packs plus a scalar tail for both dtypes
        check(name, &[input(&[3, 37], positive, seed)], |xs| f(&xs[0]));
        // non-contiguous (transposed) input
        check(
            &format!("{name} transposed"),
            &[input(&[37, 3], positive, seed)],
            |xs| f(&xs[0].t()?),
        );
        // contiguous view at an odd offset (unaligned: the scalar path only)
        check(
            &format!("{name} offset view"),
            &[input(&[112], positive, seed)],
            |xs| f(&xs[0].narrow(0, 1, 111)?),
        );
        // many blocks
        check(
            &format!("{name} large"),
            &[input(&[5, 3001], positive, seed)],
            |xs| f(&xs[0]),
        );
    }
}

#[test]
fn powf_negative_exponent_and_scalar_input() {
    check("powf -0.5", &[pos(&[4, 9], 1)], |xs| xs[0].powf(-0.5));
    check("exp of a scalar", &[randn(&[], 2)], |xs| xs[0].exp());
    check(
        "gelu qwen merger [9, 5120]",
        &[randn(&[9, 5120], 3)],
        |xs| xs[0].gelu(),
    );
}

type Binary = fn(&Tensor, &Tensor) -> Result<Tensor>;

const BINARY: [(&str, Binary); 4] = [
    ("add", |a, b| a.add(b)),
    ("sub", |a, b| a.sub(b)),
    ("mul", |a, b| a.mul(b)),
    ("div", |a, b| a.div(b)),
];

#[test]
fn binary_ops_with_broadcasting() {
    let shapes: [(&[usize], &[usize]); 10] = [
        (&[3, 37], &[3, 37]),
        (&[4, 1, 7], &[3, 7]),
        (&[3, 7], &[4, 1, 7]),
        (&[], &[5, 6]),
        (&[5, 6], &[]),
        (&[1], &[5, 6]),
        (&[5, 6], &[6]),
        (&[2, 1, 5], &[1, 4, 1]),
        (&[6, 1], &[6, 5]),
        (&[2, 3, 1, 4], &[3, 5, 1]),
    ];
    for (i, (name, f)) in BINARY.into_iter().enumerate() {
        for (j, (sa, sb)) in shapes.iter().enumerate() {
            let seed = 10 * i as u64 + 100 * j as u64;
            let b = if name == "div" {
                pos(sb, seed + 1)
            } else {
                randn(sb, seed + 1)
            };
            check(
                &format!("{name} {sa:?} {sb:?}"),
                &[randn(sa, seed), b],
                |xs| f(&xs[0], &xs[1]),
            );
        }
    }
}

#[test]
fn binary_ops_on_views() {
    for (i, (name, f)) in BINARY.into_iter().enumerate() {
        let seed = 1000 + 10 * i as u64;
        let den = |shape: &[usize], s: u64| {
            if name == "div" {
                pos(shape, s)
            } else {
                randn(shape, s)
            }
        };
        // transposed lhs, contiguous rhs
        check(
            &format!("{name} a.t() + b"),
            &[randn(&[37, 3], seed), den(&[3, 37], seed + 1)],
            |xs| f(&xs[0].t()?, &xs[1]),
        );
        // contiguous lhs, transposed rhs
        check(
            &format!("{name} a + b.t()"),
            &[randn(&[3, 37], seed), den(&[37, 3], seed + 1)],
            |xs| f(&xs[0], &xs[1].t()?),
        );
        // transposed and broadcast
        check(
            &format!("{name} a.t() + bias"),
            &[randn(&[7, 5], seed), den(&[7], seed + 1)],
            |xs| f(&xs[0].t()?, &xs[1]),
        );
        check(
            &format!("{name} [4,1,7] + b.t()"),
            &[randn(&[4, 1, 7], seed), den(&[7, 3], seed + 1)],
            |xs| f(&xs[0], &xs[1].t()?),
        );
        // same-shape contiguous views at odd offsets (unaligned fast path)
        check(
            &format!("{name} offset views"),
            &[randn(&[120], seed), den(&[120], seed + 1)],
            |xs| f(&xs[0].narrow(0, 1, 113)?, &xs[1].narrow(0, 3, 113)?),
        );
        // large same-shape (vectorised fast path, many blocks)
        check(
            &format!("{name} large"),
            &[randn(&[7, 3001], seed), den(&[7, 3001], seed + 1)],
            |xs| f(&xs[0], &xs[1]),
        );
    }
}

#[test]
fn binary_ops_qwen_shapes() {
    // residual adds: hidden states [b, seq, 2048] (text), [seq, 1280] (vision)
    check(
        "add residual [2,37,2048]",
        &[randn(&[2, 37, 2048], 1), randn(&[2, 37, 2048], 2)],
        |xs| xs[0].add(&xs[1]),
    );
    // bias add and its gradient (sum over rows)
    check(
        "add bias [37,1280]+[1280]",
        &[randn(&[37, 1280], 3), randn(&[1280], 4)],
        |xs| xs[0].add(&xs[1]),
    );
    check(
        "mul [2,37,2048]*[2048]",
        &[randn(&[2, 37, 2048], 5), randn(&[2048], 6)],
        |xs| xs[0].mul(&xs[1]),
    );
}

#[test]
fn mixed_devices_is_an_error_naming_the_op() {
    if tessera::backend::cuda::device_or_skip("mixed_devices_is_an_error_naming_the_op").is_none() {
        return;
    }
    let a = randn(&[3, 4], 1);
    let b = randn(&[3, 4], 2).to_cuda().unwrap();
    for (name, f) in BINARY {
        let e = f(&a, &b).unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
        let e = f(&b, &a).unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
    }
}

#[test]
fn sum_and_mean() {
    let x = || randn(&[4, 5, 6], 1);
    check("sum dim 1", &[x()], |xs| xs[0].sum(1, false));
    check("sum dim -1 keepdim", &[x()], |xs| xs[0].sum(-1, true));
    check("sum dim 0", &[x()], |xs| xs[0].sum(0, false));
    check("sum dims [0,1]", &[x()], |xs| {
        xs[0].sum_dims(&[0, 1], false)
    });
    check("sum dims [1,2] keepdim", &[x()], |xs| {
        xs[0].sum_dims(&[1, 2], true)
    });
    check("sum dims [2,0] (not adjacent)", &[x()], |xs| {
        xs[0].sum_dims(&[2, 0], false)
    });
    check("sum dims [] (copy)", &[x()], |xs| {
        xs[0].sum_dims(&[], false)
    });
    check("sum_all", &[x()], |xs| xs[0].sum_all());
    check("sum_all of a scalar", &[randn(&[], 2)], |xs| {
        xs[0].sum_all()
    });
    check("sum of a transposed input", &[randn(&[6, 5], 3)], |xs| {
        xs[0].t()?.sum(0, false)
    });
    // leading-dim reductions: the column kernel, with a partial block of columns
    check("sum [9,5,40] dims [0,1]", &[randn(&[9, 5, 40], 4)], |xs| {
        xs[0].sum_dims(&[0, 1], false)
    });
    check("sum [300,70] dim 0", &[randn(&[300, 70], 5)], |xs| {
        xs[0].sum(0, false)
    });
    check("sum [2,151936] dim 0", &[randn(&[2, 151936], 6)], |xs| {
        xs[0].sum(0, false)
    });
    check(
        "bias grad [37,1280] dim 0",
        &[randn(&[37, 1280], 7)],
        |xs| xs[0].sum(0, false),
    );
    // long rows: one block per row; long strided rows
    check_f32_tol(
        "sum [3,151936] dim 1",
        &[randn(&[3, 151936], 8)],
        1e-4,
        |xs| xs[0].sum(1, false),
    );
    check_f32_tol(
        "sum [151936,2] dim 0",
        &[randn(&[151936, 2], 9)],
        1e-4,
        |xs| xs[0].sum(0, false),
    );
    check("sum [4,3000,3] dim 1", &[randn(&[4, 3000, 3], 10)], |xs| {
        xs[0].sum(1, true)
    });
    // mean composes sum and affine
    check("mean dim 1", &[x()], |xs| xs[0].mean(1, false));
    check("mean dims [0,2]", &[x()], |xs| {
        xs[0].mean_dims(&[0, 2], true)
    });
    check("mean_all", &[x()], |xs| xs[0].mean_all());
}

#[test]
fn max_over_a_dim() {
    check("max [4,37,5] dim 1", &[randn(&[4, 37, 5], 1)], |xs| {
        xs[0].max(1, false)
    });
    check("max [5,1000] dim -1", &[randn(&[5, 1000], 2)], |xs| {
        xs[0].max(-1, false)
    });
    check("max [3,70] dim 1 keepdim", &[randn(&[3, 70], 3)], |xs| {
        xs[0].max(1, true)
    });
    check("max [9,40] dim 0 (columns)", &[randn(&[9, 40], 4)], |xs| {
        xs[0].max(0, false)
    });
    check("max [2,151936] dim 1", &[randn(&[2, 151936], 5)], |xs| {
        xs[0].max(1, false)
    });
    check("max [151936,2] dim 0", &[randn(&[151936, 2], 6)], |xs| {
        xs[0].max(0, false)
    });
    check("max of a transposed input", &[randn(&[7, 6], 7)], |xs| {
        xs[0].t()?.max(1, false)
    });
    // ties: the gradient goes to the first maximal element on both backends
    let ties = Tensor::from_vec(vec![1f32, 3.0, 3.0, -1.0, 2.0, 2.0, 2.0, 0.5], &[2, 4]).unwrap();
    check("max with ties", &[ties], |xs| xs[0].max(1, false));
}

#[test]
fn logsumexp_over_a_dim() {
    check("logsumexp [5,1000] dim -1", &[randn(&[5, 1000], 1)], |xs| {
        xs[0].logsumexp(-1, false)
    });
    check(
        "logsumexp [7,3,4] dim 1 keepdim",
        &[randn(&[7, 3, 4], 2)],
        |xs| xs[0].logsumexp(1, true),
    );
    check(
        "logsumexp [9,40] dim 0 (columns)",
        &[randn(&[9, 40], 3)],
        |xs| xs[0].logsumexp(0, false),
    );
    check(
        "logsumexp [2,151936] dim 1",
        &[randn(&[2, 151936], 4)],
        |xs| xs[0].logsumexp(1, false),
    );
    check(
        "logsumexp [151936,2] dim 0",
        &[randn(&[151936, 2], 5)],
        |xs| xs[0].logsumexp(0, false),
    );
}

#[test]
fn softmax_and_log_softmax() {
    type Op = fn(&Tensor, isize) -> Result<Tensor>;
    let ops: [(&str, Op); 2] = [
        ("softmax", |t, d| t.softmax(d)),
        ("log_softmax", |t, d| t.log_softmax(d)),
    ];
    for (i, (name, f)) in ops.into_iter().enumerate() {
        let seed = 100 * i as u64;
        for (j, n) in [7usize, 1000, 151936].into_iter().enumerate() {
            let s = seed + 10 * j as u64;
            check(
                &format!("{name} [2,{n}] dim -1"),
                &[randn(&[2, n], s)],
                |xs| f(&xs[0], -1),
            );
            check(
                &format!("{name} [{n},2] dim 0"),
                &[randn(&[n, 2], s + 1)],
                |xs| f(&xs[0], 0),
            );
        }
        check(
            &format!("{name} [37,7] dim -1"),
            &[randn(&[37, 7], seed + 50)],
            |xs| f(&xs[0], -1),
        );
        check(
            &format!("{name} [2,7] dim 0"),
            &[randn(&[2, 7], seed + 51)],
            |xs| f(&xs[0], 0),
        );
        check(
            &format!("{name} [4,7,5] dim 1"),
            &[randn(&[4, 7, 5], seed + 52)],
            |xs| f(&xs[0], 1),
        );
        check(
            &format!("{name} transposed input"),
            &[randn(&[7, 3], seed + 53)],
            |xs| f(&xs[0].t()?, -1),
        );
    }
}

/// softmax / log_softmax over the last dim on every launch shape of the 16-byte fast path
/// (RowVec: one warp per row with 1, 2 or 4 vectors per thread, one block per row with 1, 2, 4
/// or 8, up to 512 threads) and the fallbacks (rows too long for registers, n not a multiple
/// of the vector, a misaligned contiguous view, a leading batch dim).
#[test]
fn softmax_fast_paths() {
    type Op = fn(&Tensor, isize) -> Result<Tensor>;
    let ops: [(&str, Op); 2] = [
        ("softmax", |t, d| t.softmax(d)),
        ("log_softmax", |t, d| t.log_softmax(d)),
    ];
    for (i, (name, f)) in ops.into_iter().enumerate() {
        let seed = 1000 + 100 * i as u64;
        for (j, &(rows, n)) in [
            (64, 4096), // one block per row: bf16 2 vectors per thread, f32 4 (the bench shape)
            (33, 4096),
            (7, 1000), // bf16 one warp per row (4 vectors), f32 one block (1 vector)
            (33, 256), // one warp per row, a partial last block of rows
            (9, 512),
            (5, 8200),  // 8 vectors per thread (bf16 160 threads, f32 288)
            (3, 16384), // 8 vectors per thread (bf16 256 threads, f32 512)
            (2, 40000), // too long for registers: the looping kernel
            (7, 1001),  // n not a multiple of the vector
            (5, 1004),  // f32 vectorised, bf16 fallback
        ]
        .iter()
        .enumerate()
        {
            let s = seed + 10 * j as u64;
            check(
                &format!("{name} fast path [{rows},{n}]"),
                &[randn(&[rows, n], s)],
                |xs| f(&xs[0], -1),
            );
        }
        // Logits of magnitude ~25: the fast exp2 against the CPU's exp.
        check(
            &format!("{name} fast path large logits [16,4096]"),
            &[randn(&[16, 4096], seed + 89).mul_scalar(25.0).unwrap()],
            |xs| f(&xs[0], -1),
        );
        check(
            &format!("{name} fast path [2,64,128]"),
            &[randn(&[2, 64, 128], seed + 90)],
            |xs| f(&xs[0], -1),
        );
        // A contiguous view one element into its buffer: misaligned, the looping kernels.
        check(
            &format!("{name} misaligned view"),
            &[randn(&[33 * 4096 + 1], seed + 91)],
            |xs| f(&xs[0].narrow(0, 1, 33 * 4096)?.reshape(&[33, 4096])?, -1),
        );
    }
}
