//! Compute backends. CPU is the reference (f32/f64); CUDA comes with its own issue.
pub mod cpu;
