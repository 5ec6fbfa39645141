//! Parameters of Qwen2.5-VL under the official checkpoint names, loading from single-file or
//! sharded safetensors (any of the naming variants in use), saving in the official form,
//! and random initialisation for tests and benchmarks.

use super::config::Config;
use crate::io::TensorFile;
use crate::nn::Params;
use crate::{DType, Error, Result, Rng, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Maps the name variants written by different transformers versions to the official one:
/// `model.visual.*` / `visual.*` -> `visual.*`; `model.language_model.*`,
/// `language_model.model.*`, `language_model.*` -> `model.*`; `language_model.lm_head.*` ->
/// `lm_head.*`.
pub fn canonical_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.visual.") {
        return format!("visual.{rest}");
    }
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        return format!("model.{rest}");
    }
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        return format!("model.{rest}");
    }
    if let Some(rest) = name.strip_prefix("language_model.lm_head.") {
        return format!("lm_head.{rest}");
    }
    if let Some(rest) = name.strip_prefix("language_model.") {
        return format!("model.{rest}");
    }
    name.to_string()
}

/// Kind of initialisation of a parameter.
#[derive(Clone, Copy, PartialEq)]
enum Init {
    Normal,
    Zeros,
    Ones,
}

/// Every parameter of `config`: official name, shape, initialisation — in model order.
fn parameter_specs(c: &Config) -> Vec<(String, Vec<usize>, Init)> {
    use Init::*;
    let mut s = Vec::new();
    let v = &c.vision;
    let (vh, vi) = (v.hidden_size, v.intermediate_size);
    s.push((
        "visual.patch_embed.proj.weight".into(),
        vec![
            vh,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
        Normal,
    ));
    for i in 0..v.depth {
        let p = format!("visual.blocks.{i}");
        s.push((format!("{p}.norm1.weight"), vec![vh], Ones));
        s.push((format!("{p}.norm2.weight"), vec![vh], Ones));
        s.push((format!("{p}.attn.qkv.weight"), vec![3 * vh, vh], Normal));
        s.push((format!("{p}.attn.qkv.bias"), vec![3 * vh], Zeros));
        s.push((format!("{p}.attn.proj.weight"), vec![vh, vh], Normal));
        s.push((format!("{p}.attn.proj.bias"), vec![vh], Zeros));
        for m in ["gate_proj", "up_proj"] {
            s.push((format!("{p}.mlp.{m}.weight"), vec![vi, vh], Normal));
            s.push((format!("{p}.mlp.{m}.bias"), vec![vi], Zeros));
        }
        s.push((format!("{p}.mlp.down_proj.weight"), vec![vh, vi], Normal));
        s.push((format!("{p}.mlp.down_proj.bias"), vec![vh], Zeros));
    }
    let merged = vh * v.spatial_merge_size * v.spatial_merge_size;
    s.push(("visual.merger.ln_q.weight".into(), vec![vh], Ones));
    s.push((
        "visual.merger.mlp.0.weight".into(),
        vec![merged, merged],
        Normal,
    ));
    s.push(("visual.merger.mlp.0.bias".into(), vec![merged], Zeros));
    s.push((
        "visual.merger.mlp.2.weight".into(),
        vec![v.out_hidden_size, merged],
        Normal,
    ));
    s.push((
        "visual.merger.mlp.2.bias".into(),
        vec![v.out_hidden_size],
        Zeros,
    ));

    let t = &c.text;
    let (d, hd) = (t.hidden_size, t.head_dim());
    let (q, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
    s.push((
        "model.embed_tokens.weight".into(),
        vec![t.vocab_size, d],
        Normal,
    ));
    for i in 0..t.num_hidden_layers {
        let p = format!("model.layers.{i}");
        s.push((format!("{p}.input_layernorm.weight"), vec![d], Ones));
        s.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d], Normal));
        s.push((format!("{p}.self_attn.q_proj.bias"), vec![q], Zeros));
        s.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d], Normal));
        s.push((format!("{p}.self_attn.k_proj.bias"), vec![kv], Zeros));
        s.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d], Normal));
        s.push((format!("{p}.self_attn.v_proj.bias"), vec![kv], Zeros));
        s.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q], Normal));
        s.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            Ones,
        ));
        s.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![t.intermediate_size, d],
            Normal,
        ));
        s.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![t.intermediate_size, d],
            Normal,
        ));
        s.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![d, t.intermediate_size],
            Normal,
        ));
    }
    s.push(("model.norm.weight".into(), vec![d], Ones));
    if !c.tie_word_embeddings {
        s.push(("lm_head.weight".into(), vec![t.vocab_size, d], Normal));
    }
    s
}

/// Random parameters (weights N(0, 0.02²), biases 0, norms 1), requiring gradients.
pub fn random_params(c: &Config, dtype: DType, rng: &mut Rng) -> Result<Params> {
    let mut p = Params::default();
    for (name, shape, init) in parameter_specs(c) {
        let t = match init {
            Init::Normal => Tensor::randn(&shape, 0.02, dtype, rng)?,
            Init::Zeros => Tensor::zeros(&shape, dtype)?,
            Init::Ones => Tensor::ones(&shape, dtype)?,
        };
        p.push(name, &t.requires_grad_());
    }
    Ok(p)
}

/// Loads every parameter of `config` from `dir` (model.safetensors, or the shards listed in
/// model.safetensors.index.json), converted to `dtype`, as leaves requiring gradients.
pub fn load_params(dir: &Path, c: &Config, dtype: DType) -> Result<Params> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| Error::file(&index, format!("cannot read: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "no weight_map object"))?;
        let mut f: Vec<String> = map
            .values()
            .filter_map(|x| x.as_str().map(String::from))
            .collect();
        f.sort();
        f.dedup();
        f.into_iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let opened: Vec<TensorFile> = files.iter().map(TensorFile::open).collect::<Result<_>>()?;
    // canonical name -> (file index, name in file)
    let mut found: HashMap<String, (usize, String)> = HashMap::new();
    for (fi, f) in opened.iter().enumerate() {
        for n in f.names() {
            found.insert(canonical_name(n), (fi, n.to_string()));
        }
    }
    // Every name and shape is checked before any data is read; then the tensors load in
    // parallel (positional reads, one conversion pass each), in the specs' order.
    let mut wanted = Vec::new();
    for (name, shape, _) in parameter_specs(c) {
        let (fi, key) = found.get(&name).ok_or_else(|| {
            Error::file(
                dir,
                format!("checkpoint has no tensor '{name}' (under any known naming variant)"),
            )
        })?;
        let info_shape = opened[*fi].shape(key)?.to_vec();
        if info_shape != shape {
            return Err(Error::file(
                opened[*fi].path(),
                format!("tensor '{key}': expected shape {shape:?} from config.json, found {info_shape:?}"),
            ));
        }
        wanted.push((name, *fi, key.as_str()));
    }
    use rayon::prelude::*;
    let loaded: Vec<Tensor> = wanted
        .par_iter()
        .map(|&(_, fi, key)| opened[fi].get_as(key, dtype))
        .collect::<Result<_>>()?;
    let mut p = Params::default();
    for ((name, _, _), t) in wanted.into_iter().zip(loaded) {
        p.push(name, &t.requires_grad_());
    }
    Ok(p)
}

/// Writes `config.json` and `model.safetensors` (official names) into `dir`.
pub fn save_model_dir(
    dir: &Path,
    config_json: &serde_json::Value,
    params: &Params,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config_json).map_err(|e| Error::msg(e.to_string()))?;
    std::fs::write(&cfg_path, text)
        .map_err(|e| Error::file(&cfg_path, format!("cannot write: {e}")))?;
    let converted: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| Ok((n.to_string(), t.detach().to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, &Tensor)> = converted.iter().map(|(n, t)| (n.as_str(), t)).collect();
    crate::io::save(dir.join("model.safetensors"), &refs, None)
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    #[test]
    fn naming_variants_map_to_the_official_names() {
        assert_eq!(
            canonical_name("model.visual.blocks.0.attn.qkv.weight"),
            "visual.blocks.0.attn.qkv.weight"
        );
        assert_eq!(
            canonical_name("model.language_model.layers.3.mlp.up_proj.weight"),
            "model.layers.3.mlp.up_proj.weight"
        );
        assert_eq!(
            canonical_name("language_model.embed_tokens.weight"),
            "model.embed_tokens.weight"
        );
        assert_eq!(
            canonical_name("language_model.lm_head.weight"),
            "lm_head.weight"
        );
        assert_eq!(canonical_name("lm_head.weight"), "lm_head.weight");
        assert_eq!(canonical_name("model.norm.weight"), "model.norm.weight");
    }
}
