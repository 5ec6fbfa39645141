//! Test helpers that ship with the library, so users can check their own ops.
pub mod gradcheck;
pub use gradcheck::{check_grad, GradCheck};
pub mod cuda;
