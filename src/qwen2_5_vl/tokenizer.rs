//! Tokenizer and the Qwen2.5-VL chat template.
