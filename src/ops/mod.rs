//! Ops: one family per file, each with its forward (CPU kernels) and backward rule.
pub mod activation;
pub mod attention;
pub mod elementwise;
pub mod index;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod rope;
pub mod view;
