//! CUDA against CPU for the model ops: rms_norm, rope, swiglu, embedding, cross_entropy,
//! log_prob_of, and the index ops (cat, stack, index_select, gather, where_cond, masked_fill,
//! masked_scatter). Each check runs f32 and bf16, forward and every input gradient, on odd
//! sizes, non-contiguous views and the shapes Qwen2.5-VL uses. Without a GPU every check
//! prints that it skipped and passes.

use tessera::testing::cuda::{assert_close_to_cpu, randn, tol};
use tessera::{DType, Result, Rng, Tensor};

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

/// Runs one comparison for both dtypes. Without a GPU it still runs the CPU forward, so the
/// check's shapes are known to be valid.
fn check(name: &str, inputs: &[Tensor], grad_of: &[bool], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    for dtype in DTYPES {
        if !assert_close_to_cpu(name, inputs, grad_of, dtype, tol(dtype), &f) {
            f(inputs).unwrap_or_else(|e| panic!("{name} on the cpu: {e}"));
            return;
        }
    }
}

/// The cross-entropy tests one at a time: `cross_entropy_staged_variants_match_cpu` switches
/// the forward kernel for the whole process (`set_ce_stages`), which must not reach the tests
/// of the default kernels running beside it.
fn ce_lock() -> std::sync::MutexGuard<'static, ()> {
    static CE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    CE.lock().unwrap_or_else(|e| e.into_inner())
}

fn has_gpu(name: &str) -> bool {
    tessera::backend::cuda::device_or_skip(name).is_some()
}

/// i64 ids in 0..n of `shape` (with repeats).
fn ids(shape: &[usize], n: u64, seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let count: usize = shape.iter().product();
    let v: Vec<i64> = (0..count).map(|_| r.below(n) as i64).collect();
    Tensor::from_vec(v, shape).unwrap()
}

/// A 0/1 tensor of `shape` and `dtype`, each element set with probability `p`.
fn mask(shape: &[usize], p: f64, seed: u64, dtype: DType) -> Tensor {
    let mut r = Rng::new(seed);
    let count: usize = shape.iter().product();
    let v: Vec<f64> = (0..count)
        .map(|_| (r.uniform() < p) as u32 as f64)
        .collect();
    Tensor::from_f64s(&v, shape, dtype).unwrap()
}

// ---------------------------------------------------------------- rms_norm

#[test]
fn rms_norm_matches_cpu() {
    for (i, &(rows, d)) in [
        (1, 64),
        (3, 80),
        (37, 1000),
        (5, 3584),
        (37, 2048),
        (300, 64),
        // Many row chunks for the weight gradient's column sum (the vision tower's width).
        (1000, 1280),
    ]
    .iter()
    .enumerate()
    {
        let s = 10 * i as u64;
        check(
            &format!("rms_norm {rows}x{d}"),
            &[randn(&[rows, d], s), randn(&[d], s + 1)],
            &[true, true],
            |x| x[0].rms_norm(&x[1], 1e-6),
        );
    }
    // Leading dims [B, T, D] (the decoder) and only one of the two gradients.
    check(
        "rms_norm [2,37,80]",
        &[randn(&[2, 37, 80], 1), randn(&[80], 2)],
        &[true, false],
        |x| x[0].rms_norm(&x[1], 1e-5),
    );
    check(
        "rms_norm weight grad only",
        &[randn(&[3, 37, 64], 3), randn(&[64], 4)],
        &[false, true],
        |x| x[0].rms_norm(&x[1], 1e-6),
    );
    // Non-contiguous input: the transpose of [D, rows].
    check(
        "rms_norm transposed",
        &[randn(&[80, 37], 5), randn(&[80], 6)],
        &[true, true],
        |x| x[0].t()?.rms_norm(&x[1], 1e-6),
    );
}

/// `add_rms_norm` (a residual add and the norm after it): the fused kernels against the two
/// ops on the CPU, with both outputs used, only the norm, only the sum; rows the fused kernels
/// do not take (odd d, a misaligned view) compose the two ops on CUDA too.
#[test]
fn add_rms_norm_matches_cpu() {
    let both = |x: &[Tensor]| {
        let (h, y) = x[0].add_rms_norm(&x[1], &x[2], 1e-6)?;
        Tensor::cat(&[&h, &y], -1)
    };
    tessera::backend::cuda::count_launches(true);
    for (i, &(rows, d)) in [(37, 2048), (3, 80), (300, 64), (5, 3584), (1000, 1280)]
        .iter()
        .enumerate()
    {
        let s = 40 + 10 * i as u64;
        let inputs = [
            randn(&[rows, d], s),
            randn(&[rows, d], s + 1),
            randn(&[d], s + 2),
        ];
        check(
            &format!("add_rms_norm {rows}x{d}"),
            &inputs,
            &[true, true, true],
            both,
        );
    }
    let inputs = [
        randn(&[2, 7, 64], 1),
        randn(&[2, 7, 64], 2),
        randn(&[64], 3),
    ];
    check(
        "add_rms_norm, norm only",
        &inputs,
        &[true, true, true],
        |x| Ok(x[0].add_rms_norm(&x[1], &x[2], 1e-5)?.1),
    );
    check(
        "add_rms_norm, sum only",
        &inputs,
        &[true, false, true],
        |x| Ok(x[0].add_rms_norm(&x[1], &x[2], 1e-5)?.0),
    );
    check(
        "add_rms_norm, frozen weight",
        &inputs,
        &[false, true, false],
        both,
    );
    let odd = [randn(&[9, 81], 4), randn(&[9, 81], 5), randn(&[81], 6)];
    check("add_rms_norm 9x81", &odd, &[true, true, true], both);
    check(
        "add_rms_norm misaligned view",
        &[randn(&[5 * 64 + 1], 7), randn(&[5, 64], 8), randn(&[64], 9)],
        &[true, true, true],
        |x| {
            let a = x[0].narrow(0, 1, 5 * 64)?.reshape(&[5, 64])?;
            let (h, y) = a.add_rms_norm(&x[1], &x[2], 1e-6)?;
            Tensor::cat(&[&h, &y], -1)
        },
    );
    // The fused kernels really ran (a composition would pass the comparisons too).
    if has_gpu("add_rms_norm launches") {
        for name in ["add_rms_norm_fwd_v", "add_rms_norm_bwd_dx_v"] {
            let n = tessera::backend::cuda::launches_where(|k| k.starts_with(name));
            assert!(n > 0, "{name}* never launched");
        }
    }
}

// ---------------------------------------------------------------- rope

#[test]
fn rope_matches_cpu() {
    // Text model: q/k [B, T, H, hd] -> [B, H, T, hd] (a transposed view), cos/sin [B, 1, T, hd].
    for (i, &(b, t, h, hd)) in [
        (1, 1, 2, 64),
        (2, 37, 4, 128),
        (1, 3, 28, 128),
        (3, 5, 2, 80),
    ]
    .iter()
    .enumerate()
    {
        let s = 10 * i as u64;
        check(
            &format!("rope text [{b},{h},{t},{hd}]"),
            &[
                randn(&[b, t, h, hd], s),
                randn(&[b, 1, t, hd], s + 1),
                randn(&[b, 1, t, hd], s + 2),
            ],
            &[true, false, false],
            |x| x[0].transpose(1, 2)?.rope(&x[1], &x[2]),
        );
    }
    // Vision: q of a fused qkv [S, 3, H, 80] -> narrow(1, 0, 1).squeeze(1) = [S, H, 80] (strided),
    // cos/sin [S, 1, 80].
    check(
        "rope vision [37,16,80]",
        &[
            randn(&[37, 3, 16, 80], 1),
            randn(&[37, 1, 80], 2),
            randn(&[37, 1, 80], 3),
        ],
        &[true, false, false],
        |x| x[0].narrow(1, 1, 1)?.squeeze(1)?.rope(&x[1], &x[2]),
    );
    // tiny_lm: tables [T, hd] against [B, H, T, hd], contiguous x.
    check(
        "rope [T,hd] tables",
        &[
            randn(&[2, 3, 37, 64], 4),
            randn(&[37, 64], 5),
            randn(&[37, 64], 6),
        ],
        &[true, false, false],
        |x| x[0].rope(&x[1], &x[2]),
    );
    // The text model builds its tables on the host: cpu cos/sin with a cuda x (copied).
    let (c, s) = (randn(&[1, 1, 37, 128], 7), randn(&[1, 1, 37, 128], 8));
    check(
        "rope cpu tables",
        &[randn(&[1, 37, 4, 128], 9)],
        &[true],
        |x| x[0].transpose(1, 2)?.rope(&c, &s),
    );
    // Real tables: the rotation keeps norms (both devices agree on actual cos/sin too).
    let (c, s) = tessera::nn::rope_tables(37, 64, 10000.0, DType::F32).unwrap();
    check(
        "rope real tables",
        &[randn(&[1, 2, 37, 64], 10)],
        &[true],
        |x| x[0].rope(&c, &s),
    );
}

// ---------------------------------------------------------------- swiglu / embedding

#[test]
fn swiglu_matches_cpu() {
    for (i, shape) in [
        vec![1, 64],
        vec![3, 37, 80],
        vec![5, 3584],
        vec![1, 37, 11008],
    ]
    .iter()
    .enumerate()
    {
        let s = 10 * i as u64;
        check(
            &format!("swiglu {shape:?}"),
            &[randn(shape, s), randn(shape, s + 1)],
            &[true, true],
            |x| x[0].swiglu(&x[1]),
        );
    }
    check(
        "swiglu transposed",
        &[randn(&[80, 37], 1), randn(&[80, 37], 2)],
        &[true, true],
        |x| x[0].t()?.swiglu(&x[1].t()?),
    );
    check(
        "swiglu up grad only",
        &[randn(&[3, 1000], 3), randn(&[3, 1000], 4)],
        &[false, true],
        |x| x[0].swiglu(&x[1]),
    );
}

/// The 16-byte vector kernel of rope (h a multiple of 8 bf16 / 4 f32, aligned pointers and row
/// strides) and the general fallback (odd head dims, misaligned or oddly strided views).
#[test]
fn rope_vector_path_and_fallback_match_cpu() {
    // Vector path: the benchmark's layout [1, H, T, 128] with [T, 128] tables, contiguous x.
    check(
        "rope vec [1,32,64,128]",
        &[
            randn(&[1, 32, 64, 128], 20),
            randn(&[64, 128], 21),
            randn(&[64, 128], 22),
        ],
        &[true, false, false],
        |x| x[0].rope(&x[1], &x[2]),
    );
    // Vector path through strides: transposed q/k [B, T, H, D] -> [B, H, T, D], odd T.
    check(
        "rope vec transposed [2,4,33,128]",
        &[
            randn(&[2, 33, 4, 128], 23),
            randn(&[2, 1, 33, 128], 24),
            randn(&[2, 1, 33, 128], 25),
        ],
        &[true, false, false],
        |x| x[0].transpose(1, 2)?.rope(&x[1], &x[2]),
    );
    // D = 48: vector path for both dtypes; D = 40: vector for f32 (h = 20), fallback for bf16.
    for (i, &d) in [48usize, 40].iter().enumerate() {
        let s = 30 + 10 * i as u64;
        check(
            &format!("rope [3,5,7,{d}]"),
            &[
                randn(&[3, 5, 7, d], s),
                randn(&[7, d], s + 1),
                randn(&[7, d], s + 2),
            ],
            &[true, false, false],
            |x| x[0].rope(&x[1], &x[2]),
        );
    }
    // Fallback: head dims whose half is not a multiple of 4 (D = 36, D = 2).
    for (i, &d) in [36usize, 2].iter().enumerate() {
        let s = 50 + 10 * i as u64;
        check(
            &format!("rope odd [2,3,7,{d}]"),
            &[
                randn(&[2, 3, 7, d], s),
                randn(&[7, d], s + 1),
                randn(&[7, d], s + 2),
            ],
            &[true, false, false],
            |x| x[0].rope(&x[1], &x[2]),
        );
    }
    // Fallback: x starting 2 elements into its rows (misaligned pointer, aligned row stride 136).
    check(
        "rope misaligned x [2,4,37,136].narrow(2..130)",
        &[
            randn(&[2, 4, 37, 136], 70),
            randn(&[37, 128], 71),
            randn(&[37, 128], 72),
        ],
        &[true, false, false],
        |x| x[0].narrow(3, 2, 128)?.rope(&x[1], &x[2]),
    );
    // Fallback: aligned start but a row stride of 130 elements.
    check(
        "rope row stride 130 [2,37,130].narrow(0..128)",
        &[
            randn(&[2, 37, 130], 73),
            randn(&[37, 128], 74),
            randn(&[37, 128], 75),
        ],
        &[true, false, false],
        |x| x[0].narrow(2, 0, 128)?.rope(&x[1], &x[2]),
    );
    // Fallback: contiguous cos/sin views starting one element into their buffer (misaligned).
    check(
        "rope misaligned tables [1,2,37,128]",
        &[
            randn(&[1, 2, 37, 128], 76),
            randn(&[37 * 128 + 1], 77),
            randn(&[37 * 128 + 1], 78),
        ],
        &[true, false, false],
        |x| {
            let c = x[1].narrow(0, 1, 37 * 128)?.reshape(&[37, 128])?;
            let s = x[2].narrow(0, 1, 37 * 128)?.reshape(&[37, 128])?;
            x[0].rope(&c, &s)
        },
    );
}

/// The heads kernel of rope (`rope_heads_*`: a head dim along which cos/sin are broadcast,
/// cos/sin read once per 4 heads): head counts below, at and not a multiple of 4, the head dim
/// in any position (contiguous, transposed, a strided narrow), two broadcast dims, the inverse
/// rotation through the gradient; and the 16-byte kernel without a head dim (`rope_vec_*`).
#[test]
fn rope_heads_path_matches_cpu() {
    // [B, H, T, D] contiguous against [T, D]: B and H broadcast, H the head dim.
    for (i, &(b, h, t, d)) in [
        (1, 1, 9, 64), // one head: positions only
        (2, 3, 17, 32),
        (1, 4, 33, 128),
        (2, 6, 33, 64), // 6 heads: a full and a half group
        (1, 9, 5, 16),
        (1, 32, 40, 128), // the bench layout
    ]
    .iter()
    .enumerate()
    {
        let s = 1100 + 10 * i as u64;
        check(
            &format!("rope heads [{b},{h},{t},{d}]"),
            &[
                randn(&[b, h, t, d], s),
                randn(&[t, d], s + 1),
                randn(&[t, d], s + 2),
            ],
            &[true, false, false],
            |x| x[0].rope(&x[1], &x[2]),
        );
    }
    // Head dim last of the leading dims: [S, H, D] against [S, 1, D], x a strided narrow.
    check(
        "rope heads vision narrow [29,5,80]",
        &[
            randn(&[29, 3, 5, 80], 1170),
            randn(&[29, 1, 80], 1171),
            randn(&[29, 1, 80], 1172),
        ],
        &[true, false, false],
        |x| x[0].narrow(1, 2, 1)?.squeeze(1)?.rope(&x[1], &x[2]),
    );
    // Transposed q/k [B, T, H, D] -> [B, H, T, D] with per-batch tables [B, 1, T, D].
    check(
        "rope heads transposed [3,7,11,32]",
        &[
            randn(&[3, 11, 7, 32], 1173),
            randn(&[3, 1, 11, 32], 1174),
            randn(&[3, 1, 11, 32], 1175),
        ],
        &[true, false, false],
        |x| x[0].transpose(1, 2)?.rope(&x[1], &x[2]),
    );
    // No head dim (tables as large as x): the 16-byte kernel without heads.
    check(
        "rope vec no head dim [2,33,128]",
        &[
            randn(&[2, 33, 128], 1176),
            randn(&[2, 33, 128], 1177),
            randn(&[2, 33, 128], 1178),
        ],
        &[true, false, false],
        |x| x[0].rope(&x[1], &x[2]),
    );
}

/// The 16-byte vector kernels of swiglu (aligned pointers; any n, the n % VEC tail inside the
/// kernel) and the scalar fallback (a contiguous view at an odd element offset).
#[test]
fn swiglu_vector_path_and_fallback_match_cpu() {
    // Vector path, n a multiple of the vector width; then tails of 1..7 elements and n < VEC.
    for (i, shape) in [
        vec![64, 4096],
        vec![33, 4096],
        vec![7, 1000],
        vec![7, 999],
        vec![5, 13],
        vec![3],
    ]
    .iter()
    .enumerate()
    {
        let s = 100 + 10 * i as u64;
        check(
            &format!("swiglu vec {shape:?}"),
            &[randn(shape, s), randn(shape, s + 1)],
            &[true, true],
            |x| x[0].swiglu(&x[1]),
        );
    }
    // Fallback: gate is a contiguous view one element into its buffer (misaligned pointer).
    check(
        "swiglu misaligned gate [7,1000]",
        &[randn(&[7001], 170), randn(&[7, 1000], 171)],
        &[true, true],
        |x| x[0].narrow(0, 1, 7000)?.reshape(&[7, 1000])?.swiglu(&x[1]),
    );
    // Fallback: up misaligned by 3 elements, odd length.
    check(
        "swiglu misaligned up [7,999]",
        &[randn(&[7, 999], 172), randn(&[6996], 173)],
        &[true, true],
        |x| x[0].swiglu(&x[1].narrow(0, 3, 6993)?.reshape(&[7, 999])?),
    );
    // Vector path on views at an offset of 8 elements (16-byte aligned for both dtypes).
    check(
        "swiglu offset-8 views [33,64]",
        &[randn(&[33 * 64 + 8], 174), randn(&[33 * 64 + 8], 175)],
        &[true, true],
        |x| {
            let a = x[0].narrow(0, 8, 33 * 64)?.reshape(&[33, 64])?;
            let b = x[1].narrow(0, 8, 33 * 64)?.reshape(&[33, 64])?;
            a.swiglu(&b)
        },
    );
}

#[test]
fn embedding_matches_cpu() {
    // ids moved to cuda with the inputs (the table's gradient is a deterministic scatter-add of
    // repeated ids).
    check(
        "embedding [3,37] of [1000,64]",
        &[ids(&[3, 37], 50, 1), randn(&[1000, 64], 2)],
        &[false, true],
        |x| Tensor::embedding(&x[0], &x[1]),
    );
    check(
        "embedding u32 ids",
        &[
            ids(&[37], 7, 3).to_dtype(DType::U32).unwrap(),
            randn(&[7, 80], 4),
        ],
        &[false, true],
        |x| Tensor::embedding(&x[0], &x[1]),
    );
    // The model keeps input_ids on the cpu: cpu ids with a cuda table; Qwen vocabulary.
    let cpu_ids = ids(&[1, 37], 151936, 5);
    check(
        "embedding cpu ids, vocab 151936",
        &[randn(&[151936, 128], 6)],
        &[true],
        |x| Tensor::embedding(&cpu_ids, &x[0]),
    );
}

/// A table both looked up and used as the head's weight (Qwen's tied embeddings): the lookup's
/// backward, which runs after the head's, adds its rows into the head's gradient in place
/// (`index_select_bwd_rows_add`, autograd's `record_into`) instead of a dense gradient and an
/// add over the whole table.
#[test]
fn embedding_tied_to_the_head_matches_cpu() {
    if !has_gpu("embedding_tied_to_the_head") {
        return;
    }
    tessera::backend::cuda::count_launches(true);
    let before =
        tessera::backend::cuda::launches_where(|k| k.starts_with("index_select_bwd_rows_add"));
    let cpu_ids = ids(&[2, 19], 3000, 7);
    check(
        "embedding tied to the head, vocab 3000",
        &[randn(&[3000, 64], 8), randn(&[2, 19, 64], 9)],
        &[true, false],
        |x| {
            Tensor::embedding(&cpu_ids, &x[0])?
                .mul(&x[1])?
                .linear(&x[0], None)
        },
    );
    assert!(
        tessera::backend::cuda::launches_where(|k| k.starts_with("index_select_bwd_rows_add"))
            > before,
        "the lookup's gradient was not added into the head's in place"
    );
}

// ---------------------------------------------------------------- losses

#[test]
fn cross_entropy_matches_cpu() {
    let _ce = ce_lock();
    // Qwen vocabulary, batch 3, some targets ignored (-100).
    let mut t = ids(&[3, 5], 151936, 1).to_vec::<i64>().unwrap();
    t[1] = -100;
    t[7] = -100;
    t[14] = -100;
    let t = Tensor::from_vec(t, &[3, 5]).unwrap();
    check(
        "cross_entropy [3,5,151936]",
        &[randn(&[3, 5, 151936], 2), t.clone()],
        &[true, false],
        |x| x[0].cross_entropy(&x[1], -100),
    );
    // cpu targets (the model's labels), 2-d logits.
    let t2 = Tensor::from_vec(vec![5i64, -100, 151935], &[3]).unwrap();
    check(
        "cross_entropy [3,151936] cpu targets",
        &[randn(&[3, 151936], 3)],
        &[true],
        |x| x[0].cross_entropy(&t2, -100),
    );
    // Odd sizes; the model's shifted logits are a narrow view of [B, T, V].
    for (i, &(rows, v)) in [(1, 64), (37, 1000), (3, 80)].iter().enumerate() {
        let s = 10 * i as u64;
        check(
            &format!("cross_entropy {rows}x{v}"),
            &[randn(&[rows, v], s), ids(&[rows], v as u64, s + 1)],
            &[true, false],
            |x| x[0].cross_entropy(&x[1], -100),
        );
    }
    let labels = ids(&[2, 36], 1000, 4);
    check(
        "cross_entropy narrowed logits",
        &[randn(&[2, 37, 1000], 5)],
        &[true],
        |x| x[0].narrow(1, 0, 36)?.cross_entropy(&labels, -100),
    );
    // Every target ignored: loss 0, gradient 0.
    let none = Tensor::from_vec(vec![-100i64; 4], &[4]).unwrap();
    check(
        "cross_entropy all ignored",
        &[randn(&[4, 80], 6)],
        &[true],
        |x| x[0].cross_entropy(&none, -100),
    );
}

#[test]
fn log_prob_of_matches_cpu() {
    let _ce = ce_lock();
    check(
        "log_prob_of [3,37,1000]",
        &[randn(&[3, 37, 1000], 1), ids(&[3, 37], 1000, 2)],
        &[true, false],
        |x| x[0].log_prob_of(&x[1]),
    );
    let cpu_ids = ids(&[2], 151936, 3);
    check(
        "log_prob_of [2,151936] cpu ids",
        &[randn(&[2, 151936], 4)],
        &[true],
        |x| x[0].log_prob_of(&cpu_ids),
    );
    check(
        "log_prob_of transposed [1,80]",
        &[randn(&[80, 1], 5), ids(&[1], 80, 6)],
        &[true, false],
        |x| x[0].t()?.log_prob_of(&x[1]),
    );
}

// ---------------------------------------------------------------- cat / stack

#[test]
fn cat_and_stack_match_cpu() {
    let parts = [
        randn(&[3, 5, 64], 1),
        randn(&[3, 1, 64], 2),
        randn(&[3, 37, 64], 3),
    ];
    check("cat dim 1", &parts, &[true, true, true], |x| {
        Tensor::cat(&[&x[0], &x[1], &x[2]], 1)
    });
    let parts = [randn(&[1, 80], 4), randn(&[37, 80], 5)];
    check("cat dim 0", &parts, &[true, true], |x| {
        Tensor::cat(&[&x[0], &x[1]], 0)
    });
    let parts = [randn(&[3, 7], 6), randn(&[3, 1000], 7), randn(&[3, 3], 8)];
    check("cat dim -1", &parts, &[true, false, true], |x| {
        Tensor::cat(&[&x[0], &x[1], &x[2]], -1)
    });
    // Non-contiguous inputs (a transpose and a narrow).
    let parts = [randn(&[37, 3], 9), randn(&[3, 50], 10)];
    check("cat strided", &parts, &[true, true], |x| {
        Tensor::cat(&[&x[0].t()?, &x[1].narrow(1, 5, 40)?], 1)
    });
    // Integer tensors (forward only).
    let parts = [ids(&[2, 3], 100, 11), ids(&[2, 5], 100, 12)];
    check("cat i64", &parts, &[false, false], |x| {
        Tensor::cat(&[&x[0], &x[1]], 1)
    });
    let parts = [
        randn(&[3, 37], 13),
        randn(&[3, 37], 14),
        randn(&[3, 37], 15),
    ];
    check("stack dim 0", &parts, &[true, true, true], |x| {
        Tensor::stack(&[&x[0], &x[1], &x[2]], 0)
    });
    check("stack dim -1", &parts, &[true, true, true], |x| {
        Tensor::stack(&[&x[0], &x[1], &x[2]], -1)
    });
    // narrow's backward pads with zeros (zero_pad): middle, first and last slices, and three
    // slices of one tensor summed (the vision block's q, k, v from one qkv projection).
    check(
        "narrow backward",
        &[randn(&[3, 37, 80], 16)],
        &[true],
        |x| x[0].narrow(1, 3, 20),
    );
    check(
        "narrow backward, qkv",
        &[randn(&[37, 3, 2, 40], 17)],
        &[true],
        |x| {
            let part = |k: usize| x[0].narrow(1, k, 1);
            part(0)?.mul(&part(1)?)?.add(&part(2)?.exp()?)
        },
    );
    // zero_pad itself, from a strided view, at either end and in the middle.
    for (before, after) in [(0, 5), (4, 0), (3, 9)] {
        check(
            &format!("zero_pad {before}, {after}"),
            &[randn(&[40, 3, 7], 18)],
            &[true],
            |x| x[0].transpose(0, 2)?.zero_pad(1, before, after),
        );
    }
}

// ---------------------------------------------------------------- index_select / gather

#[test]
fn index_select_matches_cpu() {
    check(
        "index_select dim 0",
        &[randn(&[37, 80], 1), ids(&[50], 37, 2)],
        &[true, false],
        |x| x[0].index_select(&x[1], 0),
    );
    check(
        "index_select dim 1",
        &[randn(&[3, 37, 5], 3), ids(&[11], 37, 4)],
        &[true, false],
        |x| x[0].index_select(&x[1], 1),
    );
    check(
        "index_select last dim",
        &[randn(&[3, 1000], 5), ids(&[7], 1000, 6)],
        &[true, false],
        |x| x[0].index_select(&x[1], -1),
    );
    check(
        "index_select transposed",
        &[randn(&[80, 37], 7), ids(&[37], 37, 8)],
        &[true, false],
        |x| x[0].t()?.index_select(&x[1], 0),
    );
    // Vision tower: window reordering of [S, 1280] by a permutation, then the inverse of the
    // merged units [S/4, 5120]; the indices are cpu tensors.
    let s = 64;
    let mut perm: Vec<i64> = (0..s as i64).collect();
    let mut r = Rng::new(9);
    for i in (1..s).rev() {
        perm.swap(i, r.below(i as u64 + 1) as usize);
    }
    let perm = Tensor::from_vec(perm, &[s]).unwrap();
    check(
        "index_select vision rows",
        &[randn(&[s, 1280], 10)],
        &[true],
        |x| x[0].index_select(&perm, 0),
    );
    let inv = Tensor::from_vec((0..16i64).rev().collect::<Vec<_>>(), &[16]).unwrap();
    check(
        "index_select vision units",
        &[randn(&[16, 5120], 11)],
        &[true],
        |x| x[0].index_select(&inv, 0),
    );
}

#[test]
fn gather_matches_cpu() {
    check(
        "gather dim 1",
        &[randn(&[5, 37], 1), ids(&[5, 3], 37, 2)],
        &[true, false],
        |x| x[0].gather(&x[1], 1),
    );
    check(
        "gather dim 0",
        &[randn(&[37, 4], 3), ids(&[50, 3], 37, 4)],
        &[true, false],
        |x| x[0].gather(&x[1], 0),
    );
    check(
        "gather logits",
        &[randn(&[3, 1000], 5), ids(&[3, 1], 1000, 6)],
        &[true, false],
        |x| x[0].gather(&x[1], -1),
    );
    let cpu_idx = ids(&[37, 2], 80, 7);
    check(
        "gather transposed, cpu index",
        &[randn(&[80, 37], 8)],
        &[true],
        |x| x[0].t()?.gather(&cpu_idx, 1),
    );
}

// ---------------------------------------------------------------- where / masked ops

#[test]
fn where_cond_matches_cpu() {
    check(
        "where same shape",
        &[
            mask(&[3, 37], 0.5, 1, DType::F32),
            randn(&[3, 37], 2),
            randn(&[3, 37], 3),
        ],
        &[false, true, true],
        |x| Tensor::where_cond(&x[0], &x[1], &x[2]),
    );
    // Broadcasting cond, a and b (the gradients are summed back to each input's shape).
    check(
        "where broadcast",
        &[
            mask(&[3, 1, 37], 0.3, 4, DType::F32),
            randn(&[3, 5, 37], 5),
            randn(&[5, 37], 6),
        ],
        &[false, true, true],
        |x| Tensor::where_cond(&x[0], &x[1], &x[2]),
    );
    // cpu u32 condition, strided a.
    let cond = mask(&[37, 80], 0.5, 7, DType::U32);
    check(
        "where cpu cond",
        &[randn(&[80, 37], 8), randn(&[37, 80], 9)],
        &[true, true],
        |x| Tensor::where_cond(&cond, &x[0].t()?, &x[1]),
    );
}

#[test]
fn masked_fill_matches_cpu() {
    let m = mask(&[3, 1, 80], 0.4, 1, DType::U32);
    check(
        "masked_fill cpu mask",
        &[randn(&[3, 37, 80], 2)],
        &[true],
        |x| x[0].masked_fill(&m, -3.5),
    );
    check(
        "masked_fill cuda mask",
        &[randn(&[37, 1000], 3), mask(&[37, 1000], 0.5, 4, DType::F32)],
        &[true, false],
        |x| x[0].masked_fill(&x[1], 0.0),
    );
    check(
        "masked_fill transposed",
        &[randn(&[64, 3], 5), mask(&[64], 0.5, 6, DType::F32)],
        &[true, false],
        |x| x[0].t()?.masked_fill(&x[1], 2.0),
    );
}

#[test]
fn masked_scatter_matches_cpu() {
    // The model: image features into the token embeddings, mask [B, T, 1] u32 on the cpu.
    for (i, &(b, t, d)) in [(1, 37, 64), (2, 37, 80), (1, 3, 3584)].iter().enumerate() {
        let s = 10 * i as u64;
        let m = mask(&[b, t, 1], 0.4, s, DType::U32);
        let n = m.to_f64s().unwrap().iter().filter(|&&v| v != 0.0).count();
        check(
            &format!("masked_scatter [{b},{t},{d}] ({n} image tokens)"),
            &[randn(&[b, t, d], s + 1), randn(&[n, d], s + 2)],
            &[true, true],
            |x| x[0].masked_scatter(&m, &x[1]),
        );
    }
    // An elementwise mask on the device and a source with more elements than needed (its
    // unused tail gets a zero gradient).
    let m = mask(&[3, 37], 0.5, 30, DType::F32);
    let n = m.to_f64s().unwrap().iter().filter(|&&v| v != 0.0).count();
    check(
        "masked_scatter elementwise",
        &[randn(&[3, 37], 31), m, randn(&[n + 9], 32)],
        &[true, false, true],
        |x| x[0].masked_scatter(&x[1], &x[2]),
    );
    // No position set.
    let none = mask(&[2, 5, 1], 0.0, 33, DType::U32);
    check(
        "masked_scatter none set",
        &[randn(&[2, 5, 64], 34), randn(&[4, 64], 35)],
        &[true, true],
        |x| x[0].masked_scatter(&none, &x[1]),
    );
}

// ---------------------------------------------------------------- errors

#[test]
fn mixed_devices_and_dtypes_are_errors() {
    if !has_gpu("mixed_devices_and_dtypes_are_errors") {
        return;
    }
    let x = randn(&[3, 64], 1).to_cuda().unwrap();
    let w = randn(&[64], 2);
    let e = x.rms_norm(&w, 1e-6).unwrap_err().to_string();
    assert!(e.contains("rms_norm"), "{e}");
    let wb = w.to_cuda().unwrap().to_dtype(DType::BF16).unwrap();
    let e = x.rms_norm(&wb, 1e-6).unwrap_err().to_string();
    assert!(e.contains("rms_norm") && e.contains("dtype"), "{e}");
    let e = x.swiglu(&randn(&[3, 64], 3)).unwrap_err().to_string();
    assert!(e.contains("swiglu"), "{e}");
    let e = Tensor::cat(&[&x, &randn(&[1, 64], 4)], 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cat"), "{e}");
    let e = x
        .masked_scatter(&mask(&[3, 1], 1.0, 5, DType::U32), &randn(&[3, 64], 6))
        .unwrap_err()
        .to_string();
    assert!(e.contains("masked_scatter"), "{e}");
    // f64 is not a cuda dtype.
    let e = Tensor::zeros_on(&[2, 4], DType::F64, tessera::Device::Cuda)
        .and_then(|t| t.swiglu(&t))
        .unwrap_err()
        .to_string();
    assert!(e.contains("swiglu"), "{e}");
}

// ---------------------------------------------------------------- vectorised fast paths

/// rms_norm on every launch shape of the 16-byte fast path (RowVec: one warp per row with 1, 2
/// or 4 vectors per thread, one block per row with 1, 2, 4 or 8, up to 512 threads) and the
/// fallbacks (d not a multiple of the vector, a misaligned contiguous view). Both gradients, so
/// the vectorised and scalar dweight partial sums run too.
#[test]
fn rms_norm_fast_paths_match_cpu() {
    for (i, &(rows, d)) in [
        (64, 4096), // one block per row: bf16 2 vectors per thread, f32 4 (the bench shape)
        (33, 4096),
        (7, 1000),  // bf16 one warp per row (4 vectors), f32 one block (1 vector)
        (33, 256),  // one warp per row (bf16 1 vector, f32 2), a partial last block of rows
        (9, 512),   // one warp per row (bf16 2, f32 4)
        (3, 8200),  // 8 vectors per thread (bf16 160 threads, f32 288)
        (2, 16384), // 8 vectors per thread (bf16 256 threads, f32 512)
        (7, 1001),  // fallback: d not a multiple of the vector
        (5, 1004),  // f32 vectorised, bf16 fallback
    ]
    .iter()
    .enumerate()
    {
        let s = 500 + 10 * i as u64;
        check(
            &format!("rms_norm fast path {rows}x{d}"),
            &[randn(&[rows, d], s), randn(&[d], s + 1)],
            &[true, true],
            |x| x[0].rms_norm(&x[1], 1e-6),
        );
    }
    // A contiguous view one element into its buffer: misaligned, the fallback kernels.
    check(
        "rms_norm misaligned view",
        &[randn(&[33 * 4096 + 1], 600), randn(&[4096], 601)],
        &[true, true],
        |x| {
            x[0].narrow(0, 1, 33 * 4096)?
                .reshape(&[33, 4096])?
                .rms_norm(&x[1], 1e-6)
        },
    );
}

/// Labels of `rows` ids below `v` with the middle one ignored (-100).
fn labels_with_ignored(rows: usize, v: usize, seed: u64) -> Tensor {
    let mut t = ids(&[rows], v as u64, seed).to_vec::<i64>().unwrap();
    t[rows / 2] = -100;
    Tensor::from_vec(t, &[rows]).unwrap()
}

/// cross_entropy / log_prob_of through the Tensor API on every lse_pick variant: one warp per
/// row (4096, 1000, 256, up to 8192, tails of a batch, one vector per row, rows not a multiple
/// of the 8 rows of a block), row in registers (8200), the 16-byte loop (40000), the scalar
/// fallback (1001, bf16 1004, a misaligned view), and the vectorised / scalar backward (one
/// block of 32 .. 256 threads per row, several blocks per row).
#[test]
fn cross_entropy_fast_paths_match_cpu() {
    let _ce = ce_lock();
    for (i, &(rows, v)) in [
        (64, 4096),
        (33, 4096),
        (7, 1000),
        (33, 256),
        (3, 8200),
        (2, 40000),
        (7, 1001),
        (5, 1004),
        (9, 8192), // the longest warp row
        (17, 8184),
        (1, 2048),
        (11, 2056),
        (5, 8), // one vector (bf16) per row
        (3, 16),
    ]
    .iter()
    .enumerate()
    {
        let s = 700 + 10 * i as u64;
        check(
            &format!("cross_entropy fast path {rows}x{v}"),
            &[randn(&[rows, v], s), labels_with_ignored(rows, v, s + 1)],
            &[true, false],
            |x| x[0].cross_entropy(&x[1], -100),
        );
        check(
            &format!("log_prob_of fast path {rows}x{v}"),
            &[randn(&[rows, v], s + 2), ids(&[rows], v as u64, s + 3)],
            &[true, false],
            |x| x[0].log_prob_of(&x[1]),
        );
    }
    // The fused mean (ce_warp_mean) over many blocks: 625 and 2501 blocks of 8 rows, run twice
    // (its block counter must be back at zero), and rows that are all ignored (loss 0).
    for (rows, v, s) in [(5000, 64, 760), (20001, 8, 770), (5000, 64, 760)] {
        check(
            &format!("cross_entropy fused mean {rows}x{v}"),
            &[randn(&[rows, v], s), labels_with_ignored(rows, v, s + 1)],
            &[true, false],
            |x| x[0].cross_entropy(&x[1], -100),
        );
    }
    check(
        "cross_entropy all rows ignored",
        &[
            randn(&[24, 64], 780),
            Tensor::from_vec(vec![-100i64; 24], &[24]).unwrap(),
        ],
        &[true, false],
        |x| x[0].cross_entropy(&x[1], -100),
    );
    // Logits of magnitude ~25 (peaked softmax): the fast exp2 against the CPU's exp.
    check(
        "cross_entropy large logits 16x4096",
        &[
            randn(&[16, 4096], 790).mul_scalar(25.0).unwrap(),
            labels_with_ignored(16, 4096, 791),
        ],
        &[true, false],
        |x| x[0].cross_entropy(&x[1], -100),
    );
    let labels = labels_with_ignored(33, 4096, 800);
    check(
        "cross_entropy misaligned logits",
        &[randn(&[33 * 4096 + 1], 801)],
        &[true],
        |x| {
            x[0].narrow(0, 1, 33 * 4096)?
                .reshape(&[33, 4096])?
                .cross_entropy(&labels, -100)
        },
    );
}

/// The device-targets entries (targets read by the kernels, no host round trip) on cuda, the
/// Tensor API on the cpu.
fn ce_dev(x: &Tensor, t: &Tensor, ignore_index: i64) -> Result<Tensor> {
    if x.is_cuda() {
        tessera::backend::cuda::ops::loss::cross_entropy_targets(x, t, ignore_index, false)
    } else {
        x.cross_entropy(t, ignore_index)
    }
}

fn log_prob_dev(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    if x.is_cuda() {
        tessera::backend::cuda::ops::loss::log_prob_of_targets(x, t)
    } else {
        x.log_prob_of(t)
    }
}

/// Cuda targets passed straight to the kernels: i64 and u32, ignored rows, a non-contiguous
/// (narrowed) target view with leading dims, every lse_pick variant, all rows ignored.
#[test]
fn cross_entropy_device_targets_match_cpu() {
    let _ce = ce_lock();
    for (i, &(rows, v)) in [(64, 4096), (7, 1000), (7, 1001), (2, 40000), (3, 151936)]
        .iter()
        .enumerate()
    {
        let s = 900 + 10 * i as u64;
        // (the harness moves integer inputs to cuda unchanged)
        check(
            &format!("cross_entropy device i64 targets {rows}x{v}"),
            &[randn(&[rows, v], s), labels_with_ignored(rows, v, s + 1)],
            &[true, false],
            |x| ce_dev(&x[0], &x[1], -100),
        );
        let t32: Vec<u32> = ids(&[rows], v as u64, s + 2)
            .to_vec::<i64>()
            .unwrap()
            .into_iter()
            .map(|c| c as u32)
            .collect();
        let ignore = t32[0] as i64; // u32 targets with a (valid) ignored id
        let t32 = Tensor::from_vec(t32, &[rows]).unwrap();
        check(
            &format!("cross_entropy device u32 targets {rows}x{v}"),
            &[randn(&[rows, v], s + 3), t32.clone()],
            &[true, false],
            |x| ce_dev(&x[0], &x[1], ignore),
        );
        check(
            &format!("log_prob_of device i64 ids {rows}x{v}"),
            &[randn(&[rows, v], s + 4), ids(&[rows], v as u64, s + 5)],
            &[true, false],
            |x| log_prob_dev(&x[0], &x[1]),
        );
        check(
            &format!("log_prob_of device u32 ids {rows}x{v}"),
            &[randn(&[rows, v], s + 6), t32],
            &[true, false],
            |x| log_prob_dev(&x[0], &x[1]),
        );
    }
    // The model's shifted labels: a narrow view of [B, T] ids, logits [B, T - 1, V].
    check(
        "cross_entropy device narrowed targets [2,36,1000]",
        &[randn(&[2, 36, 1000], 950), ids(&[2, 37], 1000, 951)],
        &[true, false],
        |x| ce_dev(&x[0], &x[1].narrow(1, 1, 36)?, -100),
    );
    check(
        "log_prob_of device ids [3,5,4096]",
        &[randn(&[3, 5, 4096], 952), ids(&[3, 5], 4096, 953)],
        &[true, false],
        |x| log_prob_dev(&x[0], &x[1]),
    );
    let none = Tensor::from_vec(vec![-100i64; 4], &[4]).unwrap();
    check(
        "cross_entropy device targets all ignored",
        &[randn(&[4, 4096], 954), none],
        &[true, false],
        |x| ce_dev(&x[0], &x[1], -100),
    );
}

/// Device targets: shape and dtype errors name the op; an id outside the vocabulary (which
/// the device cannot report without a host synchronisation) gives NaN.
#[test]
fn cross_entropy_device_targets_errors_and_invalid_ids() {
    let _ce = ce_lock();
    use tessera::backend::cuda::ops::loss::{cross_entropy_targets, log_prob_of_targets};
    if !has_gpu("cross_entropy_device_targets_errors_and_invalid_ids") {
        return;
    }
    let x = randn(&[3, 64], 1).to_cuda().unwrap();
    let bad_shape = Tensor::from_vec(vec![1i64, 2], &[2])
        .unwrap()
        .to_cuda()
        .unwrap();
    let e = cross_entropy_targets(&x, &bad_shape, -100, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cross_entropy"), "{e}");
    let f = randn(&[3], 2).to_cuda().unwrap();
    let e = log_prob_of_targets(&x, &f).unwrap_err().to_string();
    assert!(e.contains("log_prob_of"), "{e}");
    let t = Tensor::from_vec(vec![0i64, 64, 5], &[3])
        .unwrap()
        .to_cuda()
        .unwrap();
    let l = cross_entropy_targets(&x, &t, -100, false)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(l.is_nan(), "out-of-range target: loss {l}");
    let lp = log_prob_of_targets(&x, &t).unwrap().to_f64s().unwrap();
    assert!(
        lp[0].is_finite() && lp[1].is_nan() && lp[2].is_finite(),
        "{lp:?}"
    );
}

/// The cross-entropy forward's cp.async-staged variants (`ce_stage{2,3}_mean`, picked by
/// `TESSERA_CE_STAGES` for the bandwidth experiment): the fast-path shapes (one batch, several,
/// a partial last batch, many blocks) against the CPU.
#[test]
fn cross_entropy_staged_variants_match_cpu() {
    let _ce = ce_lock();
    use tessera::backend::cuda::ops::loss::set_ce_stages;
    if tessera::backend::cuda::device_or_skip("cross_entropy_staged").is_none() {
        return;
    }
    // 1: the default kernel with the L2 prefetch; 2, 3: staged through shared memory; 4: the
    // default kernel with batches of 16 vectors a lane; 5: rows by the bulk-copy engine (sm_90;
    // the default kernel elsewhere and for rows over 8 KB), 20001 rows: ~19 a warp, so every
    // stage's barrier turns its phase several times; 4500 x 4096 (bf16): full 8 KB rows, every
    // stage reused; 6: the same with 2 stages a warp; 7: the default kernel with a quarter of
    // the exponentials by poly_exp2; 8: 5 with 7's exponentials.
    let hopper = tessera::backend::cuda::device().is_ok_and(|d| d.cc == (9, 0));
    tessera::backend::cuda::count_launches(true);
    for stages in [1, 2, 3, 4, 5, 6, 7, 8] {
        set_ce_stages(Some(stages)).unwrap();
        for (i, &(rows, v)) in [
            (64, 4096),
            (33, 8192),
            (7, 1000),
            (9, 2056),
            (5, 8),
            (5000, 64),
            (20001, 8),
            (4500, 4096), // bulk: 8 KB rows, 4-5 a warp (every stage reused)
        ]
        .iter()
        .enumerate()
        {
            let s = 900 + 10 * i as u64;
            check(
                &format!("cross_entropy staged x{stages} {rows}x{v}"),
                &[randn(&[rows, v], s), labels_with_ignored(rows, v, s + 1)],
                &[true, false],
                |x| x[0].cross_entropy(&x[1], -100),
            );
        }
    }
    // 7 and 8 with −inf logits (masked classes: poly_exp2 gives them 0, as ex2 does) in every
    // lane's polynomial vectors and MUFU vectors alike.
    for stages in [7, 8] {
        set_ce_stages(Some(stages)).unwrap();
        let mut x = randn(&[6, 4096], 990).to_vec::<f32>().unwrap();
        for (i, e) in x.iter_mut().enumerate() {
            if i % 7 == 3 {
                *e = f32::NEG_INFINITY;
            }
        }
        let x = Tensor::from_vec(x, &[6, 4096]).unwrap();
        let t = Tensor::from_vec(vec![0i64, 1, 2, 4, 5, 6], &[6]).unwrap();
        check(
            &format!("cross_entropy x{stages}, -inf logits"),
            &[x, t],
            &[true, false],
            |x| x[0].cross_entropy(&x[1], -100),
        );
    }
    // A NaN logit, not the target, in a lane's first (polynomial) vector: the loss is NaN, as
    // with the default kernel (the exponent trick alone would have made it FLT_MAX); 7 and 8.
    for (stages, dtype) in [7, 8]
        .into_iter()
        .flat_map(|s| [(s, DType::F32), (s, DType::BF16)])
    {
        if !has_gpu("cross_entropy x7/x8, a NaN logit") {
            break;
        }
        set_ce_stages(Some(stages)).unwrap();
        let mut v = randn(&[2, 4096], 991).to_vec::<f32>().unwrap();
        v[5] = f32::NAN;
        let x = Tensor::from_vec(v, &[2, 4096])
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_cuda()
            .unwrap();
        let t = Tensor::from_vec(vec![0i64, 1], &[2]).unwrap();
        let l = x.cross_entropy(&t, -100).unwrap().to_scalar().unwrap();
        assert!(
            l.is_nan(),
            "cross_entropy x{stages} {dtype}, a NaN logit: loss {l}"
        );
    }
    set_ce_stages(None).unwrap();
    // On sm_90 the bulk kernels really ran (a silent fallback would pass the comparisons), and
    // the polynomial one on any device.
    for name in ["ce_bulk_mean", "ce_bulk2_mean", "ce_bulk_poly_mean"] {
        let n = tessera::backend::cuda::launches_where(|k| k.starts_with(name));
        assert!(!hopper || n > 0, "{name} never launched on an sm_90 device");
    }
    assert!(
        tessera::backend::cuda::launches_where(|k| k.starts_with("ce_stage7_mean")) > 0,
        "ce_stage7_mean never launched"
    );
}

/// `cross_entropy_f32` (the model's loss): from bf16 logits an f32 loss computed without an f32
/// copy of the logits, its gradient written in bf16; against the CPU (f32), loss and gradient,
/// with ignored rows, a row of 8192 logits and the Qwen vocabulary.
#[test]
fn cross_entropy_f32_matches_cpu() {
    let _ce = ce_lock();
    for (i, &(rows, v)) in [(64, 4096), (9, 8192), (7, 1000), (3, 151936)]
        .iter()
        .enumerate()
    {
        let s = 950 + 10 * i as u64;
        check(
            &format!("cross_entropy_f32 {rows}x{v}"),
            &[randn(&[rows, v], s), labels_with_ignored(rows, v, s + 1)],
            &[true, false],
            |x| {
                let l = x[0].cross_entropy_f32(&x[1], -100)?;
                assert_eq!(l.dtype(), DType::F32, "the loss is f32 whatever the logits");
                Ok(l)
            },
        );
    }
}
