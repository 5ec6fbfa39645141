//! tessera: a from-scratch deep-learning framework — tensors, reverse-mode autograd, a CPU
//! backend, optimisers and safetensors IO, on which Qwen2.5-VL training is built.

pub mod autograd;
pub mod backend;
pub mod cli;
pub mod dynamics;
mod error;
pub mod io;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod qwen2_5_vl;
pub mod rl;
pub mod study;
pub mod tasks;
pub mod tensor;
pub mod testing;

pub use autograd::{grad, no_grad, NoGradGuard};
pub use error::{Error, Result};
pub use tensor::{DType, Device, Float, Rng, Tensor, WithDType};
