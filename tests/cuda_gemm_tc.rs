//! The tensor-core GEMM (kernels/gemm.cu) against the CPU on fresh random bf16 inputs, odd
//! sizes included: relative error <= 1e-2. Skips without a GPU.

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

/// The Hopper wgmma kernel (kernels/gemm_sm90.cu) on the same cases, where the device is sm_90.
#[test]
fn gemm_wgmma_matches_cpu() {
    let Some(dev) = cuda::device_or_skip("gemm_wgmma") else {
        return;
    };
    if dev.cc != (9, 0) {
        eprintln!("skipped gemm_wgmma: device is {}, not sm_90", dev.arch());
        return;
    }
    for &(m, n, k, bias) in &[
        (1usize, 1usize, 8usize, false),
        (3, 5, 8, true),
        (37, 129, 64, false),
        (127, 65, 72, true),
        (129, 257, 200, false),
        (256, 512, 256, false),
        (300, 256, 2048, true),
        (1000, 1000, 1000, false),
    ] {
        case_with(TcKernel::Wgmma, m, n, k, bias);
    }
}
