//! `config.json` of Qwen2.5-VL in both layouts: nested `text_config` + `rope_parameters`
//! (transformers >= 5) and top-level text fields + `rope_scaling` (the released checkpoints).
//! Vision fields are always read from the file (the class defaults are wrong for the
//! released models); `in_chans` and `in_channels` are both accepted.

use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// Frequencies per axis (T, H, W); sums to head_dim / 2.
    pub mrope_section: [usize; 3],
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    /// In pixels.
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub out_hidden_size: usize,
    pub tokens_per_second: usize,
    pub rope_theta: f64,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Columns of `pixel_values`: C · temporal · patch².
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tie_word_embeddings: bool,
    pub image_token_id: i64,
    pub video_token_id: i64,
    pub vision_start_token_id: i64,
    pub vision_end_token_id: i64,
    /// Activation checkpointing in training (not part of config.json; transformers'
    /// `gradient_checkpointing_enable()`): each decoder layer and vision block keeps only its
    /// inputs for the backward and computes its forward again there.
    pub gradient_checkpointing: bool,
}

fn field<'a>(objs: &[&'a Value], key: &str) -> Option<&'a Value> {
    objs.iter()
        .find_map(|o| o.get(key).filter(|v| !v.is_null()))
}

fn usize_of(objs: &[&Value], key: &str, what: &str) -> Result<usize> {
    field(objs, key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| Error::msg(format!("{what}: missing or non-integer field '{key}'")))
}

fn f64_of(objs: &[&Value], key: &str) -> Option<f64> {
    field(objs, key).and_then(Value::as_f64)
}

impl Config {
    /// The image, video, vision-start and vision-end token ids: the ids that only a vision
    /// input may put in a sequence (random text, prompts and completions must avoid them).
    pub fn vision_token_ids(&self) -> [i64; 4] {
        [
            self.image_token_id,
            self.video_token_id,
            self.vision_start_token_id,
            self.vision_end_token_id,
        ]
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        Config::from_json(&v).map_err(|e| Error::file(path, e.to_string()))
    }

    pub fn from_json(v: &Value) -> Result<Config> {
        // Text fields: nested text_config first, then the top level.
        let text_obj = v.get("text_config").filter(|t| t.is_object());
        let t: Vec<&Value> = text_obj.into_iter().chain([v]).collect();
        let rope: Vec<&Value> = ["rope_parameters", "rope_scaling"]
            .iter()
            .flat_map(|k| {
                t.iter()
                    .filter_map(move |o| o.get(*k))
                    .filter(|r| r.is_object())
            })
            .collect();
        let section = field(&rope, "mrope_section")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                Error::msg("config: no mrope_section in rope_parameters / rope_scaling")
            })?;
        let section: Vec<usize> = section
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as usize)
            .collect();
        let mrope_section: [usize; 3] = section.try_into().map_err(|s| {
            Error::msg(format!(
                "config: mrope_section must have 3 entries, got {s:?}"
            ))
        })?;
        let heads = usize_of(&t, "num_attention_heads", "text config")?;
        let text = TextConfig {
            vocab_size: usize_of(&t, "vocab_size", "text config")?,
            hidden_size: usize_of(&t, "hidden_size", "text config")?,
            intermediate_size: usize_of(&t, "intermediate_size", "text config")?,
            num_hidden_layers: usize_of(&t, "num_hidden_layers", "text config")?,
            num_attention_heads: heads,
            num_key_value_heads: usize_of(&t, "num_key_value_heads", "text config")
                .unwrap_or(heads),
            rope_theta: f64_of(&rope, "rope_theta")
                .or_else(|| f64_of(&t, "rope_theta"))
                .unwrap_or(1e6),
            rms_norm_eps: f64_of(&t, "rms_norm_eps").unwrap_or(1e-6),
            mrope_section,
        };
        let vobj = v
            .get("vision_config")
            .ok_or_else(|| Error::msg("config: missing vision_config"))?;
        let vo = [vobj];
        let vrope: Vec<&Value> = vobj.get("rope_parameters").into_iter().collect();
        let vision = VisionConfig {
            depth: usize_of(&vo, "depth", "vision_config")?,
            hidden_size: usize_of(&vo, "hidden_size", "vision_config")?,
            intermediate_size: usize_of(&vo, "intermediate_size", "vision_config")?,
            num_heads: usize_of(&vo, "num_heads", "vision_config")?,
            in_channels: usize_of(&vo, "in_channels", "vision_config")
                .or_else(|_| usize_of(&vo, "in_chans", "vision_config"))
                .unwrap_or(3),
            patch_size: usize_of(&vo, "patch_size", "vision_config")?,
            temporal_patch_size: usize_of(&vo, "temporal_patch_size", "vision_config")?,
            spatial_merge_size: usize_of(&vo, "spatial_merge_size", "vision_config")?,
            window_size: usize_of(&vo, "window_size", "vision_config")?,
            fullatt_block_indexes: field(&vo, "fullatt_block_indexes")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|x| x as usize)
                        .collect()
                })
                .ok_or_else(|| Error::msg("vision_config: missing fullatt_block_indexes"))?,
            out_hidden_size: usize_of(&vo, "out_hidden_size", "vision_config")?,
            tokens_per_second: usize_of(&vo, "tokens_per_second", "vision_config").unwrap_or(2),
            rope_theta: f64_of(&vrope, "rope_theta").unwrap_or(10000.0),
        };
        let top = [v];
        let tie = field(&top, "tie_word_embeddings")
            .or_else(|| text_obj.and_then(|o| o.get("tie_word_embeddings")))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let id = |k: &str, d: i64| field(&top, k).and_then(Value::as_i64).unwrap_or(d);
        let c = Config {
            text,
            vision,
            tie_word_embeddings: tie,
            image_token_id: id("image_token_id", 151655),
            video_token_id: id("video_token_id", 151656),
            vision_start_token_id: id("vision_start_token_id", 151652),
            vision_end_token_id: id("vision_end_token_id", 151653),
            gradient_checkpointing: false,
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let t = &self.text;
        let bad = |m: String| Err(Error::msg(format!("config: {m}")));
        if !t.hidden_size.is_multiple_of(t.num_attention_heads)
            || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads)
        {
            return bad(format!(
                "hidden {} / heads {} / kv heads {} do not divide",
                t.hidden_size, t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if 2 * t.mrope_section.iter().sum::<usize>() != t.head_dim() {
            return bad(format!(
                "mrope_section {:?} must sum to head_dim/2 = {}",
                t.mrope_section,
                t.head_dim() / 2
            ));
        }
        let v = &self.vision;
        if !v.hidden_size.is_multiple_of(v.num_heads) || !v.head_dim().is_multiple_of(4) {
            return bad(format!(
                "vision hidden {} / heads {} must give a head dim divisible by 4",
                v.hidden_size, v.num_heads
            ));
        }
        if !v
            .window_size
            .is_multiple_of(v.spatial_merge_size * v.patch_size)
        {
            return bad(format!(
                "window_size {} is not a multiple of merge·patch",
                v.window_size
            ));
        }
        if let Some(&b) = v.fullatt_block_indexes.iter().find(|&&b| b >= v.depth) {
            return bad(format!("fullatt block {b} >= depth {}", v.depth));
        }
        Ok(())
    }
}
