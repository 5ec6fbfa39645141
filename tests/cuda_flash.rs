//! The tensor-core flash attention (kernels/flash.cu) against the CPU attention on fresh
//! random bf16-rounded inputs: the forward's output and logsumexp within 2e-2, and through
//! `Tensor::attention` the output and all three gradients, with causal masks, GQA and
//! variable-length segments (`cu_seqlens`). Skips without a GPU.

use tessera::backend::cuda::{self, flash};
use tessera::ops::attention::AttentionOptions;
use tessera::testing::cuda::{hopper_or_skip, mismatch_map, randn, rel_error};
use tessera::{DType, Tensor};

fn round(t: Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn case(b: usize, hq: usize, hkv: usize, tq: usize, tk: usize, d: usize, causal: bool) {
    segmented_case(b, hq, hkv, tq, tk, d, causal, None);
}

/// Direct `flash_fwd_segments` call; `cu_seqlens` needs tq == tk.
#[allow(clippy::too_many_arguments)]
fn segmented_case(
    b: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
    causal: bool,
    cu_seqlens: Option<&[usize]>,
) {
    if cuda::device_or_skip("flash_fwd").is_none() {
        return;
    }
    let segments = cu_seqlens.map(|c| flash::Segments::from_cu_seqlens(c).unwrap());
    forward_case(
        b,
        hq,
        hkv,
        tq,
        tk,
        d,
        causal,
        cu_seqlens,
        |q, k, v, causal, scale| {
            flash::flash_fwd_segments(q, k, v, causal, scale, segments.as_ref())
        },
    );
}

/// `Tensor::attention` of bf16 q, k, v with `opts` on CUDA against the CPU: output and all
/// three gradients, at twice bf16's tolerance.
fn attention_matches_cpu(label: &str, qkv: [Tensor; 3], opts: &AttentionOptions) {
    use tessera::testing::cuda::{assert_close_to_cpu, tol};
    assert_close_to_cpu(
        label,
        &qkv,
        &[true, true, true],
        DType::BF16,
        tol(DType::BF16) * 2.0,
        |x| Tensor::attention(&x[0], &x[1], &x[2], opts),
    );
}

/// `fwd`'s output and logsumexp against the CPU attention on fresh bf16-rounded inputs.
#[allow(clippy::too_many_arguments)]
fn forward_case(
    b: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
    causal: bool,
    cu_seqlens: Option<&[usize]>,
    fwd: impl Fn(&Tensor, &Tensor, &Tensor, bool, f64) -> tessera::Result<(Tensor, Tensor)>,
) {
    let q = round(randn(&[b, hq, tq, d], 1));
    let k = round(randn(&[b, hkv, tk, d], 2));
    let v = round(randn(&[b, hkv, tk, d], 3));
    let scale = 1.0 / (d as f64).sqrt();
    let opts = AttentionOptions {
        causal,
        cu_seqlens: cu_seqlens.map(|c| c.to_vec()),
        ..Default::default()
    };
    let want = Tensor::attention(&q, &k, &v, &opts).unwrap();
    let on = |t: &Tensor| t.to_cuda().unwrap().to_dtype(DType::BF16).unwrap();
    let (o, lse) = fwd(&on(&q), &on(&k), &on(&v), causal, scale).unwrap();
    let e = rel_error(&o, &want).unwrap();
    // logsumexp on the CPU, from the scores.
    let s = q
        .matmul(&k.repeat_kv(hq / hkv))
        .unwrap()
        .mul_scalar(scale)
        .unwrap();
    let segment_of = |i: usize| cu_seqlens.map_or(0, |c| c.partition_point(|&x| x <= i));
    let s = if causal || cu_seqlens.is_some() {
        let off = tk as isize - tq as isize;
        let mask: Vec<u32> = (0..tq * tk)
            .map(|i| {
                let (row, key) = (i / tk, i % tk);
                let hidden_causal = causal && key as isize > row as isize + off;
                (hidden_causal || segment_of(row) != segment_of(key)) as u32
            })
            .collect();
        s.masked_fill(
            &Tensor::from_vec(mask, &[tq, tk])
                .unwrap()
                .expand(s.shape())
                .unwrap(),
            f64::NEG_INFINITY,
        )
        .unwrap()
    } else {
        s
    };
    let want_lse = s.logsumexp(-1, false).unwrap();
    let lse_cpu = lse.to_cpu().unwrap();
    let el = {
        let (a, w) = (lse_cpu.to_f64s().unwrap(), want_lse.to_f64s().unwrap());
        a.iter().zip(&w).fold(0f64, |m, (x, y)| {
            if x.is_infinite() && y.is_infinite() {
                m
            } else {
                m.max((x - y).abs())
            }
        })
    };
    println!("flash b{b} hq{hq} hkv{hkv} tq{tq} tk{tk} d{d} causal={causal} segments={cu_seqlens:?}: out rel {e:.2e}, lse abs {el:.2e}");
    if e > 2e-2 {
        println!(
            "output [B·H·Tq, D]: {}",
            mismatch_map(&o, &want, 2e-2).unwrap()
        );
    }
    assert!(e <= 2e-2, "flash output rel error {e}");
    assert!(el <= 2e-2, "flash lse abs error {el}");
}

trait RepeatKv {
    fn repeat_kv(&self, n: usize) -> Tensor;
}
impl RepeatKv for Tensor {
    /// [B, Hkv, T, D] -> [B, Hkv*n, D, T] (transposed for the score product).
    fn repeat_kv(&self, n: usize) -> Tensor {
        let (b, h, t, d) = (
            self.dim(0).unwrap(),
            self.dim(1).unwrap(),
            self.dim(2).unwrap(),
            self.dim(3).unwrap(),
        );
        self.unsqueeze(2)
            .unwrap()
            .expand(&[b, h, n, t, d])
            .unwrap()
            .reshape(&[b, h * n, t, d])
            .unwrap()
            .transpose(2, 3)
            .unwrap()
    }
}

#[test]
fn flash_fwd_matches_cpu() {
    case(1, 2, 2, 64, 64, 64, false);
    case(2, 4, 2, 37, 37, 64, true);
    case(1, 4, 1, 100, 129, 128, true);
    case(1, 2, 2, 129, 100, 80, false);
    case(2, 2, 1, 200, 200, 80, true);
    case(1, 3, 3, 1, 77, 128, true);
    case(1, 2, 2, 70, 50, 64, true); // early rows see no key
                                     // Several 128-query blocks, the last one partial; key tiles crossing the diagonal.
    case(1, 2, 1, 300, 300, 128, true);
    case(1, 2, 2, 257, 513, 64, false);
    case(1, 2, 2, 260, 390, 80, true);
}

/// (b, hq, hkv, tq, tk, d, causal) cases both Hopper kernels' tests run: D 64 and 128, causal
/// or not, GQA, Tq != Tk both ways, partial tiles, rows that see no key.
/// (b, hq, hkv, tq, tk, d, causal).
type Shape = (usize, usize, usize, usize, usize, usize, bool);

const WG_SHAPES: [Shape; 6] = [
    (1, 2, 2, 64, 64, 64, false),
    (2, 4, 2, 37, 37, 64, true),
    (1, 4, 1, 100, 129, 128, true),
    (1, 3, 3, 1, 77, 128, true),
    (1, 2, 2, 70, 50, 64, true), // early rows see no key
    (1, 2, 2, 257, 513, 64, false),
];

/// The Hopper forward (kernels/flash_sm90.cu: TMA, wgmma, producer and consumer warpgroups),
/// in its three schedules (plain, intra-warpgroup overlap, overlap + pingpong), on `WG_SHAPES`
/// and longer sequences; where the device is sm_90.
#[test]
fn flash_fwd_wgmma_matches_cpu() {
    if !hopper_or_skip("flash_fwd_wgmma") {
        return;
    }
    for (b, hq, hkv, tq, tk, d, causal) in WG_SHAPES.into_iter().chain([
        (1, 2, 1, 300, 300, 128, true),
        (1, 2, 2, 129, 300, 128, false),
        (2, 4, 4, 384, 384, 128, true),
        (1, 8, 2, 1024, 1024, 64, true),
        (1, 2, 2, 300, 40, 64, true), // blocks 0 and 1 see no key tile, block 2 one
    ]) {
        for schedule in 1..=3 {
            forward_case(b, hq, hkv, tq, tk, d, causal, None, |q, k, v, c, sc| {
                flash::flash_fwd_wgmma_with(q, k, v, c, sc, schedule)
            });
        }
    }
}

/// The Hopper backward (kernels/flash_sm90.cu: the dQ kernel, and the dK/dV kernel whole and
/// split per query head with f32 partials summed over the GQA group, with 2 and 3 stages), against the CPU's gradients of the
/// attention for the same upstream gradient: D 64 and 128, causal or not, GQA 1:1 to 8:1,
/// Tq != Tk both ways, partial key blocks and query tiles, rows that see no key, heads that span
/// several key blocks; where the device is sm_90.
#[test]
fn flash_bwd_wgmma_matches_cpu() {
    if !hopper_or_skip("flash_bwd_wgmma") {
        return;
    }
    for shape in WG_SHAPES.into_iter().chain([
        (1, 4, 2, 300, 300, 128, true),
        (1, 2, 1, 129, 300, 128, false),
        (1, 8, 1, 256, 256, 128, true),
        (2, 16, 2, 512, 512, 128, true),
        (1, 2, 2, 300, 40, 64, true), // query blocks that see no key tile
    ]) {
        bwd_wgmma_case(shape, &[(false, 2), (true, 2), (false, 3), (true, 3)]);
    }
}

/// One case of the Hopper backward, named by `TESSERA_FLASH_BWD_CASE="b,hq,hkv,tq,tk,d,causal,
/// split,stages"` (causal and split 0 or 1): tools/gpu/check.sh runs a matrix of them, each in
/// a process of its own, to find which parameter a fault follows. Skips when unset.
#[test]
fn flash_bwd_wgmma_case() {
    let Ok(spec) = std::env::var("TESSERA_FLASH_BWD_CASE") else {
        println!("flash_bwd_wgmma_case: skipped (TESSERA_FLASH_BWD_CASE unset)");
        return;
    };
    if !hopper_or_skip("flash_bwd_wgmma_case") {
        return;
    }
    let v: Vec<usize> = spec
        .split(',')
        .map(|x| x.trim().parse().expect("TESSERA_FLASH_BWD_CASE: integers"))
        .collect();
    assert_eq!(
        v.len(),
        9,
        "TESSERA_FLASH_BWD_CASE: b,hq,hkv,tq,tk,d,causal,split,stages"
    );
    let shape = (v[0], v[1], v[2], v[3], v[4], v[5], v[6] == 1);
    bwd_wgmma_case(shape, &[(v[7] == 1, v[8] as u8)]);
}

/// The Hopper backward on one shape, for each (split, stages), against the CPU's gradients.
fn bwd_wgmma_case((b, hq, hkv, tq, tk, d, causal): Shape, configs: &[(bool, u8)]) {
    let q = round(randn(&[b, hq, tq, d], 31));
    let k = round(randn(&[b, hkv, tk, d], 32));
    let v = round(randn(&[b, hkv, tk, d], 33));
    let up = round(randn(&[b, hq, tq, d], 34));
    let scale = 1.0 / (d as f64).sqrt();
    let opts = AttentionOptions {
        causal,
        ..Default::default()
    };
    let (qc, kc, vc) = (
        q.clone().requires_grad_(),
        k.clone().requires_grad_(),
        v.clone().requires_grad_(),
    );
    let out = Tensor::attention(&qc, &kc, &vc, &opts).unwrap();
    let want = tessera::grad(&out, Some(&up), &[&qc, &kc, &vc]).unwrap();
    let on = |t: &Tensor| t.to_cuda().unwrap().to_dtype(DType::BF16).unwrap();
    let (qg, kg, vg, ug) = (on(&q), on(&k), on(&v), on(&up));
    let (o, lse) = flash::flash_fwd(&qg, &kg, &vg, causal, scale).unwrap();
    for &(split, stages) in configs {
        flash::set_wgmma_bwd_stages(Some(stages));
        let r = flash::flash_bwd_wgmma(&qg, &kg, &vg, &o, &lse, &ug, causal, scale, Some(split));
        flash::set_wgmma_bwd_stages(None);
        let (dq, dk, dv) = r.unwrap();
        let grads = [dq, dk, dv];
        let errs: Vec<f64> = grads
            .iter()
            .zip(&want)
            .map(|(got, w)| rel_error(got, w.as_ref().unwrap()).unwrap())
            .collect();
        println!(
            "flash_bwd_wgmma b{b} hq{hq} hkv{hkv} tq{tq} tk{tk} d{d} causal={causal} split={split} stages={stages}: dq/dk/dv rel {:.2e} {:.2e} {:.2e}",
            errs[0], errs[1], errs[2]
        );
        for ((name, e), (got, w)) in ["dq", "dk", "dv"]
            .iter()
            .zip(&errs)
            .zip(grads.iter().zip(&want))
        {
            if *e > 2e-2 {
                let w = w.as_ref().unwrap();
                println!("{name} [B·H·T, D]: {}", mismatch_map(got, w, 2e-2).unwrap());
            }
            assert!(
                *e <= 2e-2,
                "flash_bwd_wgmma (split {split}, {stages} stages) {name} rel error {e}"
            );
        }
    }
}

/// Head dim 80 on the Hopper kernels (`TESSERA_FLASH_WG_D80`, off by default until a GPU run
/// validates it: the layout of 128 with the columns past 80 zero-filled by the TMA loads), where
/// the device is sm_90: the forward in its three schedules and the backward whole and split,
/// 2 and 3 stages, against the CPU (causal or not, GQA, partial tiles, Tq != Tk); then
/// `Tensor::attention` with segments of one length >= 128 (the vision tower's whole images),
/// which the switch sends through these kernels as a batch, output and gradients against the
/// CPU, launches counted. Its own process in tools/gpu/check.sh (it sets a process-wide switch).
#[test]
fn flash_wgmma_d80_and_uniform_segments_match_cpu() {
    if !hopper_or_skip("flash_wgmma_d80") {
        return;
    }
    flash::set_wgmma_d80(Some(true));
    let shapes: [Shape; 5] = [
        (1, 2, 2, 64, 64, 80, false),
        (2, 4, 2, 200, 200, 80, true),
        (1, 4, 1, 129, 300, 80, false),
        (1, 2, 2, 300, 40, 80, true),
        (1, 16, 16, 256, 256, 80, false),
    ];
    for (b, hq, hkv, tq, tk, d, causal) in shapes {
        for schedule in 1..=3 {
            forward_case(b, hq, hkv, tq, tk, d, causal, None, |q, k, v, c, sc| {
                flash::flash_fwd_wgmma_with(q, k, v, c, sc, schedule)
            });
        }
        bwd_wgmma_case(
            (b, hq, hkv, tq, tk, d, causal),
            &[(false, 2), (true, 2), (false, 3), (true, 3)],
        );
    }
    let launched = || {
        cuda::launches_where(|k| {
            k.starts_with("flash_fwd_wg") && k.ends_with("_d80")
                || k.starts_with("flash_bwd_dkdv_wg") && k.ends_with("_d80")
                || k.starts_with("flash_bwd_dq_wg_d80")
        })
    };
    cuda::count_launches(true);
    let before = launched();
    for (hq, d, causal, cu) in [
        (2usize, 80usize, false, vec![0usize, 256, 512, 768]),
        (4, 80, false, vec![0, 128, 256]),
        (2, 80, true, vec![0, 256, 512]),
        (2, 64, false, vec![0, 200, 400]),
    ] {
        let t = *cu.last().unwrap();
        let (q, k, v) = (
            randn(&[1, hq, t, d], 41),
            randn(&[1, hq, t, d], 42),
            randn(&[1, hq, t, d], 43),
        );
        let opts = AttentionOptions {
            causal,
            cu_seqlens: Some(cu.clone()),
            ..Default::default()
        };
        attention_matches_cpu(
            &format!("attention(uniform segments {cu:?} as a batch) hq{hq} d{d} causal={causal}"),
            [q, k, v],
            &opts,
        );
    }
    // Three cases at D 80, each a forward, a dK/dV and a dQ launch.
    let went = launched() - before;
    flash::set_wgmma_d80(None);
    assert!(
        went >= 9,
        "the uniform segments at D 80 did not take the Hopper kernels ({went} launches)"
    );
}

/// The forward's tile variants (benchmarks) against the CPU.
#[test]
fn flash_fwd_tile_variants_match_cpu() {
    if cuda::device_or_skip("flash_fwd_tiles").is_none() {
        return;
    }
    for (d, bm, bn) in [(128, 128, 32), (128, 64, 32), (64, 64, 64)] {
        for (tq, tk, causal) in [
            (300, 300, true),
            (129, 200, false),
            (64, 64, true),
            (70, 50, true),
        ] {
            let (b, hq, hkv) = (1, 4, 2);
            let q = round(randn(&[b, hq, tq, d], 11));
            let k = round(randn(&[b, hkv, tk, d], 12));
            let v = round(randn(&[b, hkv, tk, d], 13));
            let opts = AttentionOptions {
                causal,
                ..Default::default()
            };
            let want = Tensor::attention(&q, &k, &v, &opts).unwrap();
            let on = |t: &Tensor| t.to_cuda().unwrap().to_dtype(DType::BF16).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let (o, _) =
                flash::flash_fwd_tiles(&on(&q), &on(&k), &on(&v), causal, scale, bm, bn).unwrap();
            let e = rel_error(&o, &want).unwrap();
            println!("flash tiles {bm}x{bn} d{d}: tq{tq} tk{tk} causal={causal}: out rel {e:.2e}");
            assert!(
                e <= 2e-2,
                "flash ({bm}x{bn} tiles, d {d}) output rel error {e}"
            );
        }
    }
}

/// `Tensor::attention` in bf16 without padding/segments takes the flash forward and the
/// flash backward (dK/dV and dQ kernels); output and all three gradients match the CPU.
#[test]
fn attention_op_uses_flash_and_grads_match() {
    for &(b, hq, hkv, tq, tk, d, causal) in &[
        (2usize, 4usize, 2usize, 37usize, 37usize, 64usize, true),
        (1, 2, 1, 20, 45, 128, true),
        (1, 2, 2, 33, 33, 80, false),
        (1, 4, 1, 130, 200, 64, true),
        (2, 2, 2, 100, 100, 128, false),
        (1, 2, 2, 70, 50, 64, true),
        // Several tiles each way, GQA 2:1 (the backward's pipelines cross heads and tiles).
        (1, 4, 2, 300, 300, 128, true),
        (1, 2, 1, 200, 330, 80, false),
    ] {
        let q = randn(&[b, hq, tq, d], 11);
        let k = randn(&[b, hkv, tk, d], 12);
        let v = randn(&[b, hkv, tk, d], 13);
        let opts = AttentionOptions {
            causal,
            ..Default::default()
        };
        attention_matches_cpu(
            &format!("attention(flash fwd) b{b} hq{hq} hkv{hkv} tq{tq} tk{tk} d{d}"),
            [q, k, v],
            &opts,
        );
    }
}

/// The forward with segments, called directly: output and lse (tiles that straddle segment
/// boundaries, an empty segment, a one-token segment, GQA).
#[test]
fn flash_fwd_segments_match_cpu() {
    let windows: Vec<usize> = (0..=4).map(|i| i * 64).collect();
    segmented_case(1, 2, 2, 256, 256, 80, false, Some(&windows));
    let uneven = [0, 37, 100, 101, 230];
    segmented_case(1, 2, 2, 230, 230, 64, false, Some(&uneven));
    segmented_case(2, 4, 2, 230, 230, 128, true, Some(&uneven));
    segmented_case(1, 4, 1, 150, 150, 80, false, Some(&[0, 0, 70, 70, 150]));
}

/// Segments of at most 64 tokens (the vision windows) take 64-query blocks
/// (`flash_fwd_seg_m64_d*`): windows of 64, and short uneven segments that straddle the
/// blocks, with an empty one, causal and GQA; the launches are counted.
#[test]
fn flash_fwd_short_segments_take_64_query_blocks() {
    if cuda::device_or_skip("flash_fwd").is_none() {
        return;
    }
    let m64 = || cuda::launches_where(|k| k.starts_with("flash_fwd_seg_m64_d"));
    cuda::count_launches(true);
    let before = m64();
    let windows: Vec<usize> = (0..=6).map(|i| i * 64).collect();
    let short = [0, 13, 64, 64, 100, 150, 170, 200];
    segmented_case(2, 4, 4, 384, 384, 80, false, Some(&windows));
    segmented_case(1, 4, 2, 200, 200, 80, false, Some(&short));
    segmented_case(1, 2, 1, 200, 200, 64, true, Some(&short));
    segmented_case(1, 2, 2, 384, 384, 64, false, Some(&windows));
    assert!(
        !flash::seg_m64() || m64() >= before + 4,
        "the short segments did not take flash_fwd_seg_m64_d*"
    );
}

/// `Tensor::attention` in bf16 with `cu_seqlens` (the vision tower's windows) takes the flash
/// kernels with segments; output and all three gradients match the CPU.
#[test]
fn attention_op_with_segments_uses_flash_and_grads_match() {
    let windows: Vec<usize> = (0..=4).map(|i| i * 64).collect();
    let uneven = vec![0, 37, 100, 101, 230];
    let with_empty = vec![0, 0, 70, 70, 71, 150];
    let halves = vec![0, 256, 512];
    for (b, hq, hkv, d, causal, cu) in [
        // Windows of 64 in a sequence of 256, D 80 (the vision case).
        (1usize, 2usize, 2usize, 80usize, false, &windows),
        (2, 2, 2, 64, false, &uneven),
        (1, 2, 2, 64, true, &uneven),
        (1, 4, 2, 128, true, &uneven),
        (1, 4, 1, 80, false, &windows),
        (1, 2, 1, 80, false, &with_empty),
        // Whole-image segments spanning several tiles (the full-attention blocks).
        (1, 2, 2, 80, false, &halves),
    ] {
        let t = *cu.last().unwrap();
        let q = randn(&[b, hq, t, d], 21);
        let k = randn(&[b, hkv, t, d], 22);
        let v = randn(&[b, hkv, t, d], 23);
        let opts = AttentionOptions {
            causal,
            cu_seqlens: Some(cu.clone()),
            ..Default::default()
        };
        attention_matches_cpu(
            &format!(
                "attention(flash, segments {cu:?}) b{b} hq{hq} hkv{hkv} t{t} d{d} causal={causal}"
            ),
            [q, k, v],
            &opts,
        );
    }
}
