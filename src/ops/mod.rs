//! Ops: one family per file, each with its forward (CPU kernels) and backward rule.
pub mod elementwise;
pub mod index;
pub mod reduce;
pub mod view;
