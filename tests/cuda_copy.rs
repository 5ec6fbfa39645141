//! Layout copies on CUDA (`contiguous` of views: the 16-byte row path and the general strided
//! path), casts and fills against the CPU. Skips without a GPU.

use tessera::backend::cuda;
use tessera::testing::cuda::{randn, rel_error};
use tessera::{DType, Device, Tensor};

fn check(name: &str, x: &Tensor, view: impl Fn(&Tensor) -> Tensor) {
    for dtype in [DType::F32, DType::BF16] {
        let cpu = x.to_dtype(dtype).unwrap();
        let want = view(&cpu).contiguous().unwrap();
        let got = view(&cpu.to_cuda().unwrap()).contiguous().unwrap();
        assert!(got.is_cuda() && got.is_contiguous());
        let e = rel_error(&got, &want).unwrap();
        println!("{name} {dtype}: {e:e}");
        assert_eq!(e, 0.0, "{name} {dtype}: copies must be exact");
    }
}

#[test]
fn contiguous_of_views_matches_cpu() {
    if cuda::device_or_skip("contiguous_of_views_matches_cpu").is_none() {
        return;
    }
    // The attention heads transpose [B, T, H, D] -> [B, H, T, D]: last dim contiguous.
    let x = randn(&[2, 37, 4, 64], 1);
    check("heads transpose d64", &x, |t| t.transpose(1, 2).unwrap());
    let x = randn(&[3, 5, 2, 80], 2);
    check("heads transpose d80", &x, |t| t.transpose(1, 2).unwrap());
    // Odd last dim (no 16-byte rows), true transposes, narrow with an odd offset.
    let x = randn(&[7, 13, 3], 3);
    check("odd last dim", &x, |t| t.transpose(0, 1).unwrap());
    let x = randn(&[33, 65], 4);
    check("2d transpose", &x, |t| t.t().unwrap());
    // The 64 x 64 tiled transpose of 2-byte elements: partial tiles, odd and even sides (the
    // paired 4-byte accesses and their element-wise fallbacks), a transposed narrow view.
    for (i, &(r, c)) in [(130, 67), (64, 128), (200, 3), (1, 77), (129, 129), (66, 2)]
        .iter()
        .enumerate()
    {
        let x = randn(&[r, c], 20 + i as u64);
        check(&format!("2d transpose {r}x{c}"), &x, |t| t.t().unwrap());
    }
    let x = randn(&[70, 90], 30);
    check("transpose of a narrow view", &x, |t| {
        t.narrow(1, 1, 75).unwrap().t().unwrap()
    });
    let x = randn(&[9, 40], 5);
    check("narrow odd offset", &x, |t| t.narrow(1, 3, 32).unwrap());
    check("narrow aligned", &x, |t| t.narrow(1, 8, 16).unwrap());
    let x = randn(&[4, 3, 2, 5, 16], 6);
    check("rank 5 permute", &x, |t| {
        t.permute(&[2, 0, 3, 1, 4]).unwrap()
    });
    check("broadcast", &randn(&[1, 24], 7), |t| {
        t.expand(&[5, 24]).unwrap()
    });
}

#[test]
fn casts_and_fills_match_cpu() {
    if cuda::device_or_skip("casts_and_fills_match_cpu").is_none() {
        return;
    }
    let x = randn(&[1001], 8);
    let want = x.to_dtype(DType::BF16).unwrap();
    let got = x.to_cuda().unwrap().to_dtype(DType::BF16).unwrap();
    assert_eq!(
        rel_error(&got, &want).unwrap(),
        0.0,
        "f32 -> bf16 must round like the CPU"
    );
    let back = got.to_dtype(DType::F32).unwrap();
    assert_eq!(
        rel_error(&back, &want.to_dtype(DType::F32).unwrap()).unwrap(),
        0.0
    );
    // The 8-element vector path, its tail, and a start that is not 16-byte aligned.
    for n in [1usize, 7, 8, 9, 16, 4099] {
        let x = randn(&[n], 40 + n as u64);
        let want = x.to_dtype(DType::BF16).unwrap();
        let got = x.to_cuda().unwrap().to_dtype(DType::BF16).unwrap();
        assert_eq!(rel_error(&got, &want).unwrap(), 0.0, "f32 -> bf16, n = {n}");
        let back = got.to_dtype(DType::F32).unwrap();
        let want_back = want.to_dtype(DType::F32).unwrap();
        assert_eq!(
            rel_error(&back, &want_back).unwrap(),
            0.0,
            "bf16 -> f32, n = {n}"
        );
    }
    let x = randn(&[203], 50);
    let want = x.narrow(0, 3, 200).unwrap().to_dtype(DType::BF16).unwrap();
    let got = x.to_cuda().unwrap().narrow(0, 3, 200).unwrap();
    let got = got.to_dtype(DType::BF16).unwrap();
    assert_eq!(
        rel_error(&got, &want).unwrap(),
        0.0,
        "cast of an offset view"
    );
    for dtype in [DType::F32, DType::BF16] {
        let f = Tensor::full_on(&[3, 333], 1.5, dtype, Device::Cuda).unwrap();
        assert!(f.to_f64s().unwrap().iter().all(|&v| v == 1.5));
        let z = Tensor::zeros_on(&[77], dtype, Device::Cuda).unwrap();
        assert!(z.to_f64s().unwrap().iter().all(|&v| v == 0.0));
    }
}

/// Uploads go through a pinned staging ring without synchronising (src/backend/cuda/
/// staging.rs): many uploads of mixed sizes (wrapping the 32 MiB ring several times, some
/// larger than half of it: the synchronising path), each host buffer dropped right after its
/// upload, all read back at the end. A region of the ring reused before its copy finished would
/// show up as a wrong value.
#[test]
fn uploads_through_the_staging_ring_arrive_intact() {
    if cuda::device_or_skip("uploads_through_the_staging_ring_arrive_intact").is_none() {
        return;
    }
    let sizes = [
        1usize,
        3,
        1000,
        1 << 20,
        3 << 20,
        5 << 20,
        17,
        4096,
        2 << 20,
        6 << 20,
    ];
    let mut uploads = Vec::new();
    for round in 0..6u32 {
        for (i, &n) in sizes.iter().enumerate() {
            let tag = (round * 100 + i as u32) as f32;
            let host: Vec<f32> = (0..n).map(|j| tag + (j % 1013) as f32 * 1e-3).collect();
            let dev = Tensor::from_vec(host, &[n]).unwrap().to_cuda().unwrap();
            uploads.push((tag, n, dev));
        }
    }
    for (tag, n, dev) in &uploads {
        let back = dev.to_cpu().unwrap().to_vec::<f32>().unwrap();
        assert_eq!(back.len(), *n);
        for (j, &x) in back.iter().enumerate() {
            let want = tag + (j % 1013) as f32 * 1e-3;
            assert_eq!(x, want, "upload {tag} ({n} floats): element {j}");
        }
    }
}
