//! The tensor-core GEMMs (kernels/gemm.cu, kernels/gemm_sm90.cu) against the CPU on fresh
//! random bf16 inputs, odd sizes, bias, accumulation and batches included: relative error
//! <= 1e-2. Skips without a GPU.

use tessera::backend::cuda::{self, gemm_tc, gemm_tc::TcKernel};
use tessera::testing::cuda::{randn, rel_error};
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
    let got = gemm_tc::matmul_bt_with(
        kernel,
        &on(&a),
        &on(&b),
        if bias { Some(on(&c)) } else { None }.as_ref(),
    )
    .unwrap();
    let e = rel_error(&got, &want).unwrap();
    println!("{kernel:?} {m}x{n}x{k} bias={bias}: rel {e:.2e}");
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

/// Whether the device is sm_90 (the Hopper kernels' tests run); says why not otherwise.
fn hopper_or_skip(name: &str) -> bool {
    let Some(dev) = cuda::device_or_skip(name) else {
        return false;
    };
    if dev.cc != (9, 0) {
        eprintln!("skipped {name}: device is {}, not sm_90", dev.arch());
        return false;
    }
    true
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
    // Plus shapes that pick each tile width (fewer tiles than SMs: 128, then 64).
    let extra = [
        (4096, 256, 1024, false),
        (2048, 2048, 512, true),
        (1100, 3000, 136, false),
    ];
    for (m, n, k, bias) in HOPPER_CASES.into_iter().chain(extra) {
        case_with(TcKernel::WgmmaWs, m, n, k, bias);
    }
    batched_case(TcKernel::WgmmaWs, 3, 130, 300, 96, false, true, false);
    batched_case(TcKernel::WgmmaWs, 3, 130, 300, 96, true, false, true);
    batched_case(TcKernel::WgmmaWs, 2, 257, 72, 520, true, true, true);
    batched_case(TcKernel::WgmmaWs, 1, 64, 40, 16, false, false, true);
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
