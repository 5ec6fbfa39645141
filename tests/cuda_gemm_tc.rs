//! The tensor-core GEMMs (kernels/gemm.cu, kernels/gemm_sm90.cu) against the CPU on fresh
//! random bf16 inputs, odd sizes, bias, accumulation and batches included: relative error
//! <= 1e-2. Skips without a GPU.

use tessera::backend::cuda::{self, gemm_tc, gemm_tc::TcKernel};
use tessera::testing::cuda::{hopper_or_skip, mismatch_map, randn, rel_error};
use tessera::DType;

fn case(m: usize, n: usize, k: usize, bias: bool) {
    if cuda::device_or_skip("gemm_tc").is_none() {
        return;
    }
    case_with(TcKernel::MmaSync, m, n, k, bias);
}

/// `kernel`'s product of fresh bf16-rounded inputs against the CPU.
fn case_with(kernel: TcKernel, m: usize, n: usize, k: usize, bias: bool) {
    let a = randn(&[m, k], 1)
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = randn(&[n, k], 2)
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let c = randn(&[n], 3)
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let want = a.matmul(&b.t().unwrap()).unwrap();
    let want = if bias { want.add(&c).unwrap() } else { want };
    let on = |t: &tessera::Tensor| t.to_cuda().unwrap().to_dtype(DType::BF16).unwrap();
    // NaN in the block the output will most likely reuse (the allocator hands back the last
    // freed block of a size class): an element the kernel fails to write cannot pass by holding
    // an earlier test's result.
    drop(tessera::Tensor::full_on(&[m, n], f64::NAN, DType::BF16, tessera::Device::Cuda).unwrap());
    let got = gemm_tc::matmul_bt_with(
        kernel,
        &on(&a),
        &on(&b),
        if bias { Some(on(&c)) } else { None }.as_ref(),
    )
    .unwrap();
    let e = rel_error(&got, &want).unwrap();
    println!("{kernel:?} {m}x{n}x{k} bias={bias}: rel {e:.2e}");
    if e > 1e-2 {
        println!("C [m, n]: {}", mismatch_map(&got, &want, 1e-2).unwrap());
    }
    assert!(e <= 1e-2, "{kernel:?} {m}x{n}x{k}: rel error {e}");
}

#[test]
fn gemm_tc_small_and_odd() {
    case(1, 1, 8, false);
    case(3, 5, 8, true);
    case(37, 129, 64, false);
    case(127, 65, 72, true);
    case(129, 257, 200, false);
}

#[test]
fn gemm_tc_model_shapes() {
    case(256, 256, 256, false);
    case(512, 2048, 2048, true);
    case(300, 256, 2048, false);
    case(1000, 1000, 1000, false);
}

/// (m, n, k, bias) cases of both Hopper kernels: odd sizes, K = 8, long K.
const HOPPER_CASES: [(usize, usize, usize, bool); 8] = [
    (1, 1, 8, false),
    (3, 5, 8, true),
    (37, 129, 64, false),
    (127, 65, 72, true),
    (129, 257, 200, false),
    (256, 512, 256, false),
    (300, 256, 2048, true),
    (1000, 1000, 1000, false),
];

/// Shapes that make the warp-specialised kernel pick each tile width on a 132-SM H100/H200
/// (`ws_block_n`'s wave model): 64 (4096 x 256: one wave of 128 tiles), 256 (2048 x 2048: one
/// wave of 128; 1100 x 3000: one of 108, edges in both dims) and 128 (4096 x 1280: three waves of
/// 128-wide tiles against two of 256, the second 21% full).
const WS_WIDTH_CASES: [(usize, usize, usize, bool); 4] = [
    (4096, 256, 1024, false),
    (2048, 2048, 512, true),
    (1100, 3000, 136, false),
    (4096, 1280, 264, true),
];

/// Asserts that the warp-specialised kernel of each tile width launched since `before`
/// (launch counts by name prefix, taken with `cuda::count_launches(true)`), on a 132-SM device
/// (where `WS_WIDTH_CASES` picks each width).
fn assert_every_width_ran(before: [u64; 3]) {
    let dev = cuda::device().expect("device");
    if dev.sm_count != 132 {
        eprintln!(
            "{} SMs: the widths each case picks differ from a 132-SM card's; not asserted",
            dev.sm_count
        );
        return;
    }
    for (i, name) in WS_KERNEL_WIDTHS.iter().enumerate() {
        assert!(
            cuda::launches_where(|k| k.starts_with(name)) > before[i],
            "no {name} launch: WS_WIDTH_CASES no longer cover every tile width"
        );
    }
}

const WS_KERNEL_WIDTHS: [&str; 3] = [
    "gemm_wgmma_ws_bf16",
    "gemm_wgmma_ws_n128_bf16",
    "gemm_wgmma_ws_n64_bf16",
];

fn ws_launches() -> [u64; 3] {
    WS_KERNEL_WIDTHS.map(|name| cuda::launches_where(|k| k.starts_with(name)))
}

/// The Hopper wgmma kernel (kernels/gemm_sm90.cu) on the same cases, where the device is sm_90.
#[test]
fn gemm_wgmma_matches_cpu() {
    if !hopper_or_skip("gemm_wgmma") {
        return;
    }
    for (m, n, k, bias) in HOPPER_CASES {
        case_with(TcKernel::Wgmma, m, n, k, bias);
    }
}

/// Fresh random bf16-representable f32 values.
fn bf16_randn(shape: &[usize], seed: u64) -> tessera::Tensor {
    randn(shape, seed)
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// `batch` products through the raw launcher: A [batch, m, k], B [batch, n, k] (or one [n, k]
/// shared by every batch: batch stride 0), C [batch, m, n] starting from random values when
/// `accumulate`, bias [n]; each batch against the CPU.
#[allow(clippy::too_many_arguments)]
fn batched_case(
    kernel: TcKernel,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    shared_b: bool,
    bias: bool,
    accumulate: bool,
) {
    let a = bf16_randn(&[batch, m, k], 11);
    let b = bf16_randn(&[if shared_b { 1 } else { batch }, n, k], 12);
    let c0 = bf16_randn(&[batch, m, n], 13);
    let bias_t = bf16_randn(&[n], 14);
    let on = |t: &tessera::Tensor| t.to_cuda().unwrap().to_dtype(DType::BF16).unwrap();
    let (ga, gb, gbias) = (on(&a), on(&b), on(&bias_t));
    let out = on(&c0);
    gemm_tc::launch_with(
        kernel,
        ga.cuda_ptr().unwrap(),
        gb.cuda_ptr().unwrap(),
        out.cuda_ptr().unwrap(),
        if bias {
            Some(gbias.cuda_ptr().unwrap())
        } else {
            None
        },
        (m, n, k),
        (k, k, n),
        batch,
        (m * k, if shared_b { 0 } else { n * k }, m * n),
        accumulate,
    )
    .unwrap();
    let got = out.to_dtype(DType::F32).unwrap().to_cpu().unwrap();
    for i in 0..batch {
        let ai = a.narrow(0, i, 1).unwrap().reshape(&[m, k]).unwrap();
        let bi = b
            .narrow(0, if shared_b { 0 } else { i }, 1)
            .unwrap()
            .reshape(&[n, k])
            .unwrap();
        let mut want = ai.matmul(&bi.t().unwrap()).unwrap();
        if bias {
            want = want.add(&bias_t).unwrap();
        }
        if accumulate {
            let ci = c0.narrow(0, i, 1).unwrap().reshape(&[m, n]).unwrap();
            want = want.add(&ci).unwrap();
        }
        let gi = got
            .narrow(0, i, 1)
            .unwrap()
            .reshape(&[m, n])
            .unwrap()
            .contiguous()
            .unwrap();
        let e = rel_error(&gi, &want).unwrap();
        println!(
            "{kernel:?} batch {i}/{batch} {m}x{n}x{k} shared_b={shared_b} bias={bias} acc={accumulate}: rel {e:.2e}"
        );
        if e > 1e-2 {
            println!("C [m, n]: {}", mismatch_map(&gi, &want, 1e-2).unwrap());
        }
        assert!(
            e <= 1e-2,
            "{kernel:?} batch {i} {m}x{n}x{k} shared_b={shared_b} bias={bias} acc={accumulate}: rel error {e}"
        );
    }
}

/// The warp-specialised Hopper kernel (TMA + producer/consumer warpgroups) on odd sizes, every
/// tile width it picks (256, 128, 64), long K, bias, accumulation and batches with B shared.
#[test]
fn gemm_wgmma_ws_matches_cpu() {
    if !hopper_or_skip("gemm_wgmma_ws") {
        return;
    }
    cuda::count_launches(true);
    let before = ws_launches();
    for (m, n, k, bias) in HOPPER_CASES.into_iter().chain(WS_WIDTH_CASES) {
        case_with(TcKernel::WgmmaWs, m, n, k, bias);
    }
    assert_every_width_ran(before);
    batched_case(TcKernel::WgmmaWs, 3, 130, 300, 96, false, true, false);
    batched_case(TcKernel::WgmmaWs, 3, 130, 300, 96, true, false, true);
    batched_case(TcKernel::WgmmaWs, 2, 257, 72, 520, true, true, true);
    batched_case(TcKernel::WgmmaWs, 1, 64, 40, 16, false, false, true);
}

/// The warp-specialised kernel with the TMA-store epilogue (the `_ts` kernels: the tile through
/// shared memory to the TMA engine, which clips the edges): odd sizes, every tile width, bias,
/// batches with C as a 3-d map, every operand layout pair. Products that accumulate, or whose C
/// rows are not a multiple of 8 elements, take the default epilogue (covered too).
#[test]
fn gemm_wgmma_ws_tma_store_matches_cpu() {
    use gemm_tc::Major::{K, MN};
    if !hopper_or_skip("gemm_wgmma_ws_tma_store") {
        return;
    }
    cuda::count_launches(true);
    let ts_before = cuda::launches_where(|k| k.contains("_ts"));
    // 4100 x 1904: 128 x 256 tiles whose last column block keeps 112 columns (the second round
    // of 128 skipped, the first clipped) and whose last row block keeps 4 rows (one consumer
    // skipped, the other clipped).
    let extra = [
        (4096, 2048, 2048, true),
        (200, 72, 64, true),
        (4100, 1904, 136, true),
    ];
    let before = ws_launches();
    for (m, n, k, bias) in HOPPER_CASES.into_iter().chain(WS_WIDTH_CASES).chain(extra) {
        case_with(TcKernel::WgmmaWsTma, m, n, k, bias);
    }
    assert_every_width_ran(before);
    // The same edges into an output of random values (anything left unwritten shows).
    majors_case_with(
        TcKernel::WgmmaWsTma,
        (K, K),
        1,
        (4100, 1904, 136),
        false,
        true,
        false,
    );
    assert!(
        cuda::launches_where(|k| k.contains("_ts")) > ts_before,
        "no TMA-store (_ts) kernel ran"
    );
    batched_case(TcKernel::WgmmaWsTma, 3, 130, 304, 96, false, true, false);
    batched_case(TcKernel::WgmmaWsTma, 2, 257, 72, 520, true, true, false);
    batched_case(TcKernel::WgmmaWsTma, 3, 130, 300, 96, false, true, false);
    batched_case(TcKernel::WgmmaWsTma, 2, 257, 72, 520, true, true, true);
    for majors in [(MN, K), (K, MN), (MN, MN)] {
        majors_case_with(
            TcKernel::WgmmaWsTma,
            majors,
            1,
            (129, 256, 200),
            false,
            true,
            false,
        );
        majors_case_with(
            TcKernel::WgmmaWsTma,
            majors,
            2,
            (257, 72, 520),
            true,
            false,
            false,
        );
    }
}

/// The accumulate and batched paths of the other kernels, so the warp-specialised one is
/// checked against the same contract.
#[test]
fn gemm_tc_batched_and_accumulate() {
    if cuda::device_or_skip("gemm_tc_batched").is_none() {
        return;
    }
    batched_case(TcKernel::MmaSync, 3, 130, 300, 96, false, true, false);
    batched_case(TcKernel::MmaSync, 3, 130, 300, 96, true, false, true);
}

/// Logical [batch, rows, k] operand of `C = A · Bᵀ` stored as the kernel reads it: K-major as
/// [batch, rows, k]; MN-major as [batch, k, ld] with ld = rows rounded up to 8 (the padding
/// columns hold values too, which the kernel must not read). Returns (storage, logical, ld,
/// batch stride).
fn stored_operand(
    major: gemm_tc::Major,
    batch: usize,
    rows: usize,
    k: usize,
    seed: u64,
) -> (tessera::Tensor, tessera::Tensor, usize, usize) {
    match major {
        gemm_tc::Major::K => {
            let s = bf16_randn(&[batch, rows, k], seed);
            (s.clone(), s, k, rows * k)
        }
        gemm_tc::Major::MN => {
            let ld = rows.next_multiple_of(8);
            let s = bf16_randn(&[batch, k, ld], seed);
            let logical = s
                .narrow(2, 0, rows)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            (s, logical, ld, k * ld)
        }
    }
}

/// One product through `launch_majors` (the warp-specialised kernel reading each operand as
/// stored) against the CPU, per batch.
fn majors_case(
    majors: (gemm_tc::Major, gemm_tc::Major),
    batch: usize,
    mnk: (usize, usize, usize),
    shared_b: bool,
    bias: bool,
    accumulate: bool,
) {
    majors_case_with(
        TcKernel::WgmmaWs,
        majors,
        batch,
        mnk,
        shared_b,
        bias,
        accumulate,
    );
}

/// `majors_case` through either epilogue of the warp-specialised kernel.
#[allow(clippy::too_many_arguments)]
fn majors_case_with(
    kernel: TcKernel,
    majors: (gemm_tc::Major, gemm_tc::Major),
    batch: usize,
    (m, n, k): (usize, usize, usize),
    shared_b: bool,
    bias: bool,
    accumulate: bool,
) {
    let (sa, a, lda, batch_a) = stored_operand(majors.0, batch, m, k, 21);
    let nb = if shared_b { 1 } else { batch };
    let (sb, b, ldb, batch_b) = stored_operand(majors.1, nb, n, k, 22);
    let c0 = bf16_randn(&[batch, m, n], 23);
    let bias_t = bf16_randn(&[n], 24);
    let on = |t: &tessera::Tensor| t.to_cuda().unwrap().to_dtype(DType::BF16).unwrap();
    let (ga, gb, gbias, out) = (on(&sa), on(&sb), on(&bias_t), on(&c0));
    gemm_tc::launch_majors(
        kernel,
        ga.cuda_ptr().unwrap(),
        gb.cuda_ptr().unwrap(),
        out.cuda_ptr().unwrap(),
        bias.then(|| gbias.cuda_ptr().unwrap()),
        (m, n, k),
        (lda, ldb, n),
        batch,
        (batch_a, if shared_b { 0 } else { batch_b }, m * n),
        accumulate,
        majors,
    )
    .unwrap();
    let got = out.to_dtype(DType::F32).unwrap().to_cpu().unwrap();
    for i in 0..batch {
        let pick = |t: &tessera::Tensor, j: usize, r: usize| {
            t.narrow(0, j, 1).unwrap().reshape(&[r, k]).unwrap()
        };
        let bi = pick(&b, if shared_b { 0 } else { i }, n);
        let mut want = pick(&a, i, m).matmul(&bi.t().unwrap()).unwrap();
        if bias {
            want = want.add(&bias_t).unwrap();
        }
        if accumulate {
            let ci = c0.narrow(0, i, 1).unwrap().reshape(&[m, n]).unwrap();
            want = want.add(&ci).unwrap();
        }
        let gi = got.narrow(0, i, 1).unwrap().reshape(&[m, n]).unwrap();
        let gi = gi.contiguous().unwrap();
        let e = rel_error(&gi, &want).unwrap();
        if e > 1e-2 {
            println!("C [m, n]: {}", mismatch_map(&gi, &want, 1e-2).unwrap());
        }
        let what = format!(
            "{kernel:?} {majors:?} batch {i}/{batch} {m}x{n}x{k} shared_b={shared_b} bias={bias} acc={accumulate}"
        );
        println!("{what}: rel {e:.2e}");
        assert!(e <= 1e-2, "{what}: rel error {e}");
    }
}

/// The warp-specialised kernel reading M/N-contiguous operands as stored (wgmma's transpose
/// mode, TMA boxes of 64 M/N x 64 K): every layout pair, odd sizes, every tile width, boxes
/// wholly past M or N, K not a multiple of 64 (or of 8, when both are MN-major), batches with B
/// shared, bias and accumulation.
#[test]
fn gemm_wgmma_ws_mn_major_matches_cpu() {
    use gemm_tc::Major::{K, MN};
    if !hopper_or_skip("gemm_wgmma_ws_mn_major") {
        return;
    }
    let shapes = [
        (1, 1, 8),
        (3, 5, 8),
        (37, 129, 64),
        (127, 65, 72),
        (129, 257, 200),
        (300, 256, 2048),
        (1000, 1000, 1000),
        (4096, 256, 1024),
        (2048, 2048, 512),
        (1100, 3000, 136),
        (4096, 1280, 72),
    ];
    cuda::count_launches(true);
    let mn_kernel = |k: &str| k.ends_with("_ta") || k.ends_with("_tb") || k.ends_with("_tab");
    let before = cuda::launches_where(mn_kernel);
    let widths_before = ws_launches();
    for majors in [(MN, K), (K, MN), (MN, MN)] {
        for (i, &mnk) in shapes.iter().enumerate() {
            majors_case(majors, 1, mnk, false, i % 2 == 1, false);
        }
        // 128 x 256 tiles (264 of them, more than the SMs): B over four 64-wide boxes, six TMA
        // boxes a stage, edges in both M and N; with the TMA-store epilogue too.
        majors_case(majors, 1, (4100, 1904, 200), false, true, false);
        majors_case_with(
            TcKernel::WgmmaWsTma,
            majors,
            1,
            (4100, 1904, 200),
            false,
            true,
            false,
        );
        // The 128-wide tiles (4096 x 1280: three waves of them, `ws_block_n`) with the TMA-store
        // epilogue, as the vision tower's weight gradients take them.
        majors_case_with(
            TcKernel::WgmmaWsTma,
            majors,
            1,
            (4096, 1280, 72),
            false,
            true,
            false,
        );
        majors_case(majors, 3, (130, 300, 96), false, true, false);
        majors_case(majors, 3, (130, 300, 96), true, false, true);
        majors_case(majors, 2, (257, 72, 520), true, true, true);
    }
    // Both MN-major: K is the strided dimension, any size (rows past K read as zeros).
    for mnk in [(130, 300, 37), (64, 40, 1), (200, 136, 1001)] {
        majors_case((MN, MN), 1, mnk, false, false, false);
    }
    majors_case((MN, MN), 2, (96, 80, 13), true, true, true);
    assert!(
        cuda::launches_where(mn_kernel) > before,
        "no MN-major kernel ran"
    );
    assert_every_width_ran(widths_before);
}

/// `Tensor::linear` / `matmul` on CUDA bf16 with the MN-major mode on: the backward's `G · W`
/// and `Gᵀ · X` and a row-major `A · B` read their operands as stored; outputs and gradients
/// against the CPU (1e-2).
#[test]
fn mn_major_products_match_cpu() {
    use tessera::testing::cuda::assert_close_to_cpu;
    if !hopper_or_skip("mn_major_products") {
        return;
    }
    gemm_tc::set_mn_major(Some(true));
    cuda::count_launches(true);
    let mn_kernel = |k: &str| k.ends_with("_ta") || k.ends_with("_tb") || k.ends_with("_tab");
    let before = cuda::launches_where(mn_kernel);
    let x = randn(&[300, 136], 31);
    let w = randn(&[264, 136], 32);
    let b = randn(&[264], 33);
    assert_close_to_cpu(
        "linear 300x136 -> 264 (MN-major backward)",
        &[x, w, b],
        &[true, true, true],
        DType::BF16,
        1e-2,
        |xs| xs[0].linear(&xs[1], Some(&xs[2])),
    );
    // Rows not a multiple of 8 (K of the weight gradient), odd output width.
    let x = randn(&[2, 77, 64], 34);
    let w = randn(&[40, 64], 35);
    assert_close_to_cpu(
        "linear 2x77x64 -> 40 (MN-major backward)",
        &[x, w],
        &[true, true],
        DType::BF16,
        1e-2,
        |xs| xs[0].linear(&xs[1], None),
    );
    let a = randn(&[200, 72], 36);
    let bm = randn(&[72, 136], 37);
    assert_close_to_cpu(
        "matmul 200x72 @ 72x136 (B MN-major)",
        &[a, bm],
        &[true, true],
        DType::BF16,
        1e-2,
        |xs| xs[0].matmul(&xs[1]),
    );
    gemm_tc::set_mn_major(None);
    assert!(
        cuda::launches_where(mn_kernel) > before,
        "the products took no MN-major kernel (the transposing path instead)"
    );
}
