//! Learning-dynamics probes (reference/study.md, after Ren & Sutherland): how one gradient
//! step on a training sample x_u changes the log-probability of a probe x_v.
//!
//! - `select`: which parameters (glob patterns over the official names).
//! - `sample`: per-sample log π(y|x) and its gradient, flattened to f64; ‖A(x)‖².
//! - `step`: one SGD step written in place and undone bit-exactly.
//! - `influence`: predicted Δ log π (gradient inner products) and measured Δ (real steps),
//!   cosines, LBK, perplexity; probes streamed one at a time.
//! - `report`: influence.csv, summary.md, influence.png.
//!
//! Formulas and the sign convention (θ ← θ + η ∇ log π(x_u)): docs/dynamics.md.

pub mod influence;
pub mod report;
pub mod sample;
pub mod select;
pub mod step;

pub use influence::{
    arm_summary, influence, pearson, perplexity, perplexity_of, ArmDynamics, InfluenceOptions,
    InfluenceReport, SampleSource, Stats, Timing,
};
pub use sample::{sample_gradient, sample_stats, single_batch, Objective, SampleGrad, SampleStats};
pub use select::{glob_match, ParamSelector, SelectedParams};
pub use step::{apply_step, with_step, AppliedStep};
