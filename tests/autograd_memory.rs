//! The graph and its saved activations are freed by backward. Alone in its own test binary
//! because it reads the process-wide byte gauge.

use tessera::tensor::live_bytes;
use tessera::{DType, Rng, Tensor};

#[test]
fn backward_returns_the_graph_memory() {
    let mut rng = Rng::new(1);
    let w = Tensor::randn(&[256, 256], 0.05, DType::F32, &mut rng)
        .unwrap()
        .requires_grad_();
    let x = Tensor::randn(&[64, 256], 1.0, DType::F32, &mut rng).unwrap();
    let before = live_bytes();
    // A deep chain: every layer saves activations.
    let mut h = x.clone();
    for _ in 0..8 {
        h = h
            .linear(&w, None)
            .unwrap()
            .gelu()
            .unwrap()
            .rms_norm(&Tensor::ones(&[256], DType::F32).unwrap(), 1e-6)
            .unwrap();
    }
    let loss = h.sum_all().unwrap();
    let during = live_bytes();
    assert!(
        during > before + 8 * 64 * 256 * 4,
        "activations should be alive: {during} vs {before}"
    );
    drop(h);
    loss.backward().unwrap();
    let after = live_bytes();
    // What remains: the loss scalar and w's gradient (256*256 f32), nothing per layer.
    let grad_bytes = 256 * 256 * 4;
    assert!(
        after <= before + grad_bytes + 1024,
        "graph not freed: {} bytes left beyond the gradient",
        after as i64 - (before + grad_bytes) as i64
    );
    drop(loss);
    w.zero_grad();
    assert!(live_bytes() <= before + 1024);
}
