//! Which parameters the per-sample gradients cover: glob patterns over the official names.
//!
//! `*` matches any run of characters, dots included, so `model.layers.*.mlp.*` picks every
//! MLP weight of every decoder layer and `*` picks everything. Patterns are comma-separated;
//! a parameter is selected when any pattern matches its whole name.

use crate::nn::Params;
use crate::{Error, Result, Tensor};

/// Glob patterns over parameter names; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSelector {
    patterns: Vec<String>,
}

impl Default for ParamSelector {
    fn default() -> Self {
        ParamSelector::all()
    }
}

impl ParamSelector {
    /// Every parameter.
    pub fn all() -> ParamSelector {
        ParamSelector {
            patterns: vec!["*".to_string()],
        }
    }

    /// Comma-separated glob patterns, e.g. `model.layers.*.mlp.*,lm_head.weight`.
    pub fn parse(spec: &str) -> Result<ParamSelector> {
        let patterns: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect();
        if patterns.is_empty() {
            return Err(Error::msg(format!(
                "parameter selector {spec:?}: no patterns (want e.g. 'model.layers.*.mlp.*')"
            )));
        }
        Ok(ParamSelector { patterns })
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// True when any pattern matches the whole of `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| glob_match(p, name))
    }

    /// The selected parameters of `params`, in their order. Errors when a pattern matches no
    /// parameter (a typo would otherwise silently measure nothing).
    pub fn resolve(&self, params: &Params) -> Result<SelectedParams> {
        for p in &self.patterns {
            if !params.iter().any(|(n, _)| glob_match(p, n)) {
                let some: Vec<&str> = params.iter().map(|(n, _)| n).take(4).collect();
                return Err(Error::msg(format!(
                    "parameter pattern {p:?} matches no parameter (names look like {some:?})"
                )));
            }
        }
        let (names, tensors): (Vec<String>, Vec<Tensor>) = params
            .iter()
            .filter(|(n, _)| self.matches(n))
            .map(|(n, t)| (n.to_string(), t.clone()))
            .unzip();
        if let Some(n) = names.iter().zip(&tensors).find(|(_, t)| !t.requires_grad()) {
            return Err(Error::msg(format!(
                "parameter '{}' does not require gradients (load the model with QwenVl::load)",
                n.0
            )));
        }
        let numel = tensors.iter().map(Tensor::numel).sum();
        Ok(SelectedParams {
            names,
            tensors,
            numel,
        })
    }
}

/// The parameters a selector picked: the model's own leaves (shared buffers), so a step
/// written into them changes the model.
#[derive(Clone)]
pub struct SelectedParams {
    pub names: Vec<String>,
    pub tensors: Vec<Tensor>,
    /// Length of a flattened gradient: the sum of the tensors' element counts.
    pub numel: usize,
}

/// `*`-only glob: true when `pattern` matches the whole of `name`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Greedy matching with backtracking to the last `*` (linear for `*`-only patterns).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn stars_match_any_run_including_dots() {
        assert!(glob_match("*", "lm_head.weight"));
        assert!(glob_match(
            "model.layers.*.mlp.*",
            "model.layers.12.mlp.up_proj.weight"
        ));
        assert!(!glob_match(
            "model.layers.*.mlp.*",
            "model.layers.1.self_attn.q_proj.weight"
        ));
        assert!(glob_match("*.bias", "visual.blocks.0.attn.qkv.bias"));
        assert!(!glob_match("lm_head.weight", "lm_head.weight2"));
        assert!(!glob_match("lm_head", "lm_head.weight"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "x"));
    }
}
