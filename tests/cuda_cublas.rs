//! cuBLAS as the GEMM benchmark reference (`--gemm cublas`): `Tensor::matmul` and `linear`
//! sent to cuBLAS give the CPU's outputs and gradients (f32 1e-5, bf16 1e-2), and cuBLAS really
//! ran. Its own binary: the choice is process-wide, and the other binaries' tests assert which
//! kernel ran. Skips without a GPU, or (with a note) without libcublas.

use tessera::backend::cuda::{self, gemm_tc};
use tessera::testing::cuda::{assert_close_to_cpu, randn, tol};
use tessera::{DType, Result, Tensor};

type Case = (&'static str, Vec<Tensor>, fn(&[Tensor]) -> Result<Tensor>);

fn cases() -> Vec<Case> {
    vec![
        (
            "matmul 37x129x65",
            vec![randn(&[37, 129], 1), randn(&[129, 65], 2)],
            |x| x[0].matmul(&x[1]),
        ),
        (
            "matmul 1x1x1",
            vec![randn(&[1, 1], 3), randn(&[1, 1], 4)],
            |x| x[0].matmul(&x[1]),
        ),
        (
            "matmul 65x1x3",
            vec![randn(&[65, 1], 5), randn(&[1, 3], 6)],
            |x| x[0].matmul(&x[1]),
        ),
        (
            "matmul a.t() @ b.t()",
            vec![randn(&[37, 21], 7), randn(&[19, 37], 8)],
            |x| x[0].t()?.matmul(&x[1].t()?),
        ),
        (
            "matmul batched",
            vec![randn(&[3, 33, 17], 9), randn(&[3, 17, 9], 10)],
            |x| x[0].matmul(&x[1]),
        ),
        // Two batch dims that collapse into one stride; a permuted batch (strided operands);
        // B broadcast over A's batch (one product of all rows; its summed dB: the kernels).
        (
            "matmul 2 batch dims",
            vec![randn(&[2, 3, 5, 7], 11), randn(&[2, 3, 7, 4], 12)],
            |x| x[0].matmul(&x[1]),
        ),
        (
            "matmul permuted batch",
            vec![randn(&[3, 17, 33], 13), randn(&[9, 3, 17], 14)],
            |x| x[0].transpose(1, 2)?.matmul(&x[1].permute(&[1, 2, 0])?),
        ),
        (
            "matmul broadcast b",
            vec![randn(&[3, 33, 17], 15), randn(&[17, 9], 16)],
            |x| x[0].matmul(&x[1]),
        ),
        (
            "linear bias",
            vec![
                randn(&[2, 5, 37], 17),
                randn(&[19, 37], 18),
                randn(&[19], 19),
            ],
            |x| x[0].linear(&x[1], Some(&x[2])),
        ),
        // One row: the bias broadcast to [1, 19] is a view that counts as contiguous, and the
        // product must not be written into the bias itself: the second call would then see
        // the first's output as its bias.
        (
            "linear one row, twice",
            vec![randn(&[1, 37], 22), randn(&[19, 37], 23), randn(&[19], 24)],
            |x| {
                x[0].linear(&x[1], Some(&x[2]))?;
                x[0].linear(&x[1], Some(&x[2]))
            },
        ),
        (
            "linear k 3420",
            vec![randn(&[24, 3420], 20), randn(&[40, 3420], 21)],
            |x| x[0].linear(&x[1], None),
        ),
    ]
}

#[test]
fn cublas_reference_matches_cpu() {
    if cuda::device_or_skip("cublas_reference_matches_cpu").is_none() {
        return;
    }
    cuda::count_launches(true);
    let run = || -> Result<()> {
        for (name, inputs, f) in cases() {
            let grads = vec![true; inputs.len()];
            for dtype in [DType::F32, DType::BF16] {
                assert_close_to_cpu(
                    &format!("cublas {name}"),
                    &inputs,
                    &grads,
                    dtype,
                    tol(dtype),
                    f,
                );
            }
        }
        Ok(())
    };
    match gemm_tc::with_gemm_choice("cublas", run) {
        Err(e) if e.to_string().contains("libcublas") => {
            cuda::skip_note(&format!("skipped cublas_reference_matches_cpu: {e}"));
            return;
        }
        r => r.expect("cublas"),
    }
    let n = cuda::launches_where(|k| k == "cublas_gemm");
    println!("cuBLAS ran {n} products");
    // About 60: every case's products (forward and gradients) in two dtypes, less the one
    // cuBLAS leaves to the kernels (the broadcast case's summed dB).
    assert!(n >= 40, "cuBLAS ran only {n} of the products");
}
