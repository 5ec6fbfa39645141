//! Compute backends. CPU is the reference (f32/f64); CUDA (f32/bf16) is tested against it.
pub mod cpu;
pub mod cuda;
