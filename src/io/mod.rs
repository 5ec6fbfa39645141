//! Checkpoint and tensor file IO.

pub mod safetensors;

pub use safetensors::{load, load_as, save, TensorFile, TensorInfo};
