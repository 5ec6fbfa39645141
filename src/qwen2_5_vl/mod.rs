//! Qwen2.5-VL, readable top to bottom in the order data flows:
//! preprocess → vision → merge → rope → decoder → logits.

pub mod preprocess;
pub mod tokenizer;
