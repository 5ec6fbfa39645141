//! Learning-dynamics probes: per-sample gradients, influence, LBK, perplexity.
