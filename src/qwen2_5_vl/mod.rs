//! Qwen2.5-VL, readable top to bottom in the order data flows:
//! preprocess → vision → merge → rope → decoder → logits.

pub mod config;
pub mod generate;
pub mod model;
pub mod preprocess;
pub mod rope;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use config::Config;
pub use model::{Batch, Output, QwenVl};
