//! Define-by-run reverse mode. Each op that sees an input requiring gradients wraps its
//! output with a `Node`: edges to the inputs' nodes (or leaves) and a one-shot backward
//! closure holding the saved activations. `backward` runs the closures in reverse
//! topological order and drops each one after use, so the graph's memory is returned as
//! soon as the gradients exist.

use crate::tensor::{Tensor, TensorId};
use crate::{Error, Result};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Maps the output gradient to one gradient per input (None where the input needs none).
pub type BackwardFn = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// An op with several outputs (`record_many`): maps one gradient per output (None for an
/// output no gradient reached) to one gradient per input.
pub type ManyBackwardFn =
    Box<dyn FnOnce(&[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// A one-input op's gradient added into its input's gradient so far (`record_into`): maps the
/// output gradient and that total (moved in) to the new total.
pub type IntoFn = Box<dyn FnOnce(&Tensor, Tensor) -> Result<Tensor> + Send + Sync>;

enum Backward {
    One(BackwardFn),
    Many(ManyBackwardFn),
}

/// Where an input's gradient goes: output `slot` of the node that made it, or a leaf.
pub enum Edge {
    Node(Arc<Node>, usize),
    Leaf(Tensor),
}

pub struct Node {
    name: &'static str,
    edges: Vec<Option<Edge>>,
    /// Number of outputs (1 except for `record_many`'s nodes).
    slots: usize,
    backward: Mutex<Option<Backward>>,
    /// `record_into`'s accumulation, taken instead of `backward` when the input already has a
    /// gradient in this pass.
    into: Mutex<Option<IntoFn>>,
    /// The part of the model that recorded the node (`part`).
    part: Option<&'static str>,
}

impl Node {
    pub fn name(&self) -> &'static str {
        self.name
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
    /// The part of the model the ops now issued belong to, and whether they are a backward's
    /// (`part`): the CUDA profile's attribution of kernels.
    static PART: Cell<(Option<&'static str>, bool)> = const { Cell::new((None, false)) };
}

/// While alive, the ops issued belong to the part of the model `name` ("text mlp", "vision
/// attention (windows)"): the CUDA profile (`TESSERA_PROFILE=1`) sums kernels by it, and the
/// nodes recorded keep it, so their backward's kernels are counted to it too. Costs a
/// thread-local write; restores the previous part on drop.
pub fn part(name: &'static str) -> PartGuard {
    PartGuard(PART.with(|p| p.replace((Some(name), false))))
}

/// The part (`part`) and whether inside a node's backward, for the ops issued now.
pub fn current_part() -> (Option<&'static str>, bool) {
    PART.with(|p| p.get())
}

#[must_use = "the part ends when the guard drops"]
pub struct PartGuard((Option<&'static str>, bool));

impl Drop for PartGuard {
    fn drop(&mut self) {
        PART.with(|p| p.set(self.0));
    }
}

/// A node's backward runs in the part that recorded it.
fn backward_part(node: &Node) -> PartGuard {
    PartGuard(PART.with(|p| p.replace((node.part, true))))
}

pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// While alive, ops record no graph (restores the previous mode on drop).
pub struct NoGradGuard {
    _mode: GradMode,
}

impl NoGradGuard {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        NoGradGuard {
            _mode: GradMode::set(false),
        }
    }
}

/// While alive, ops record a graph (`set(true)`: a recomputation inside a backward, which
/// runs under `NoGradGuard`) or not; restores the previous mode on drop.
struct GradMode(bool);

impl GradMode {
    fn set(enabled: bool) -> Self {
        GradMode(GRAD_ENABLED.with(|g| g.replace(enabled)))
    }
}

impl Drop for GradMode {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.0));
    }
}

/// Runs `f` without recording a graph.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _g = NoGradGuard::new();
    f()
}

/// Whether an op on `inputs` must record a node.
pub fn needs_grad(inputs: &[&Tensor]) -> bool {
    is_grad_enabled() && inputs.iter().any(|t| t.requires_grad())
}

/// Wraps `out` (computed without a graph) with a node whose backward is `backward`.
/// `backward` returns one entry per input, in order.
pub fn record(
    name: &'static str,
    out: Tensor,
    inputs: &[&Tensor],
    backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Tensor {
    if !needs_grad(inputs) {
        return out;
    }
    let node = Arc::new(Node {
        name,
        edges: edges_of(inputs),
        slots: 1,
        backward: Mutex::new(Some(Backward::One(Box::new(backward)))),
        into: Mutex::new(None),
        part: current_part().0,
    });
    out.with_grad_fn(node)
}

/// `record` for a one-input op whose gradient is sparse in its input: an embedding's few
/// thousand rows of a 151936-row table. When the input already has a gradient from elsewhere in
/// the same backward pass (the tied lm_head's product, whose backward runs first), `into(g,
/// total)` adds this op's gradient to that total (in place where the total is not shared), instead
/// of `backward` building a dense gradient of the whole input for an add: at the 3B model's
/// table, a 622 MB memset and an add over 1.9 GB. Otherwise `backward` runs as with `record`.
pub fn record_into(
    name: &'static str,
    out: Tensor,
    input: &Tensor,
    backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    into: impl FnOnce(&Tensor, Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Tensor {
    if !needs_grad(&[input]) {
        return out;
    }
    let node = Arc::new(Node {
        name,
        edges: edges_of(&[input]),
        slots: 1,
        backward: Mutex::new(Some(Backward::One(Box::new(backward)))),
        into: Mutex::new(Some(Box::new(into))),
        part: current_part().0,
    });
    out.with_grad_fn(node)
}

fn edges_of(inputs: &[&Tensor]) -> Vec<Option<Edge>> {
    inputs
        .iter()
        .map(|t| match t.grad_fn() {
            Some(n) => Some(Edge::Node(n.clone(), 0)),
            None if t.requires_grad() => Some(Edge::Leaf((*t).clone())),
            None => None,
        })
        .collect()
}

/// `record` for an op with several outputs: one node whose backward sees every output's
/// gradient at once (a split's backward writes them into one buffer instead of zero-padding
/// each and adding). Each output gets a pass-through node of its own into its slot.
pub fn record_many(
    name: &'static str,
    outs: Vec<Tensor>,
    inputs: &[&Tensor],
    backward: impl FnOnce(&[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Vec<Tensor> {
    if !needs_grad(inputs) {
        return outs;
    }
    let node = Arc::new(Node {
        name,
        edges: edges_of(inputs),
        slots: outs.len(),
        backward: Mutex::new(Some(Backward::Many(Box::new(backward)))),
        into: Mutex::new(None),
        part: current_part().0,
    });
    outs.into_iter()
        .enumerate()
        .map(|(i, out)| {
            let part = Arc::new(Node {
                name,
                edges: vec![Some(Edge::Node(node.clone(), i))],
                slots: 1,
                backward: Mutex::new(Some(Backward::One(Box::new(|g: &Tensor| {
                    Ok(vec![Some(g.clone())])
                })))),
                into: Mutex::new(None),
                part: current_part().0,
            });
            out.with_grad_fn(part)
        })
        .collect()
}

fn node_key(n: &Arc<Node>) -> usize {
    Arc::as_ptr(n) as usize
}

/// Nodes reachable from `roots`, each after all nodes that consume it.
fn topo_order(roots: &[&Arc<Node>]) -> Vec<Arc<Node>> {
    let mut order = Vec::new();
    let mut visited = std::collections::HashSet::new();
    // Iterative post-order DFS from each root in turn, to completion, with one visited set:
    // (node, next edge to visit).
    for root in roots {
        if !visited.insert(node_key(root)) {
            continue;
        }
        let mut stack: Vec<(Arc<Node>, usize)> = vec![((*root).clone(), 0)];
        while let Some((node, i)) = stack.pop() {
            if i < node.edges.len() {
                stack.push((node.clone(), i + 1));
                if let Some(Edge::Node(child, _)) = &node.edges[i] {
                    if visited.insert(node_key(child)) {
                        stack.push((child.clone(), 0));
                    }
                }
            } else {
                order.push(node);
            }
        }
    }
    order.reverse();
    order
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        None => g,
        Some(prev) => prev.add(&g)?,
    });
    Ok(())
}

/// Runs the graph under `root` backwards from `root_grad`; returns the gradient of every
/// leaf reached, keyed by leaf id, with the leaf itself.
fn run_backward(root: &Tensor, root_grad: Tensor) -> Result<HashMap<TensorId, (Tensor, Tensor)>> {
    if root.grad_fn().is_none() && !root.requires_grad() {
        return Err(Error::Autograd(
            "backward on a tensor that does not require gradients (no parameter in its graph, \
             or computed under no_grad)"
                .into(),
        ));
    }
    run_backward_many(&[(root.clone(), root_grad)])
}

/// `run_backward` from several roots at once, each with its upstream gradient (one pass over
/// the graph they share). Roots that do not require gradients are skipped.
fn run_backward_many(roots: &[(Tensor, Tensor)]) -> Result<HashMap<TensorId, (Tensor, Tensor)>> {
    let _g = NoGradGuard::new();
    let mut leaves: HashMap<TensorId, (Tensor, Tensor)> = HashMap::new();
    let add_leaf = |leaves: &mut HashMap<TensorId, (Tensor, Tensor)>, leaf: &Tensor, g: Tensor| {
        let id = leaf.id();
        match leaves.remove(&id) {
            None => leaves.insert(id, (leaf.clone(), g)),
            Some((l, prev)) => leaves.insert(id, (l, prev.add(&g)?)),
        };
        Ok::<(), Error>(())
    };
    // Per node, the gradient of each of its outputs so far.
    let mut grads: HashMap<usize, Vec<Option<Tensor>>> = HashMap::new();
    let mut root_nodes = Vec::new();
    for (root, root_grad) in roots {
        if root_grad.shape() != root.shape() {
            return Err(Error::Autograd(format!(
                "upstream gradient has shape {:?} but the tensor has {:?}",
                root_grad.shape(),
                root.shape()
            )));
        }
        match root.grad_fn() {
            Some(n) => {
                let slots = grads
                    .entry(node_key(n))
                    .or_insert_with(|| vec![None; n.slots]);
                accumulate(&mut slots[0], root_grad.clone())?;
                root_nodes.push(n.clone());
            }
            None if root.requires_grad() => add_leaf(&mut leaves, root, root_grad.clone())?,
            None => {}
        }
    }
    let order = topo_order(&root_nodes.iter().collect::<Vec<_>>());
    for node in order {
        let Some(g) = grads.remove(&node_key(&node)) else {
            continue;
        };
        if g.iter().all(Option::is_none) {
            continue;
        }
        let f = node
            .backward
            .lock()
            .expect("node lock")
            .take()
            .ok_or_else(|| {
                Error::Autograd(format!(
                    "the graph through {} was already freed by an earlier backward",
                    node.name
                ))
            })?;
        let _part = backward_part(&node);
        // `record_into`: the input's gradient so far, if it has one, takes this op's gradient.
        let into = node.into.lock().expect("node lock").take();
        if let (Some(into), [Some(edge)]) = (into, &node.edges[..]) {
            let g0 = g[0].as_ref().expect("one-output node with a gradient");
            let prior = match edge {
                Edge::Leaf(l) => leaves.remove(&l.id()).map(|(_, t)| t),
                Edge::Node(n, slot) => grads.get_mut(&node_key(n)).and_then(|s| s[*slot].take()),
            };
            if let Some(prior) = prior {
                drop(f);
                let shape = prior.shape().to_vec();
                let total = into(g0, prior)?;
                if total.shape() != shape {
                    return Err(Error::Autograd(format!(
                        "{} added its gradient into {:?} and returned {:?}",
                        node.name,
                        shape,
                        total.shape()
                    )));
                }
                match edge {
                    Edge::Leaf(l) => {
                        leaves.insert(l.id(), (l.clone(), total));
                    }
                    Edge::Node(n, slot) => {
                        grads.get_mut(&node_key(n)).expect("the slot taken above")[*slot] =
                            Some(total);
                    }
                }
                continue;
            }
        }
        let input_grads = match f {
            Backward::One(f) => f(g[0].as_ref().expect("one-output node with a gradient"))?,
            Backward::Many(f) => f(&g)?,
        };
        if input_grads.len() != node.edges.len() {
            return Err(Error::Autograd(format!(
                "{} backward returned {} gradients for {} inputs",
                node.name,
                input_grads.len(),
                node.edges.len()
            )));
        }
        for (edge, ig) in node.edges.iter().zip(input_grads) {
            let (Some(edge), Some(ig)) = (edge, ig) else {
                continue;
            };
            match edge {
                Edge::Node(n, slot) => {
                    let slots = grads
                        .entry(node_key(n))
                        .or_insert_with(|| vec![None; n.slots]);
                    accumulate(&mut slots[*slot], ig)?
                }
                Edge::Leaf(l) => {
                    if ig.shape() != l.shape() {
                        return Err(Error::Autograd(format!(
                            "{} produced a gradient of shape {:?} for an input of shape {:?}",
                            node.name,
                            ig.shape(),
                            l.shape()
                        )));
                    }
                    add_leaf(&mut leaves, l, ig)?
                }
            }
        }
    }
    Ok(leaves)
}

impl Tensor {
    /// Backward from a scalar: accumulates d self / d leaf into every leaf's `grad()`.
    pub fn backward(&self) -> Result<()> {
        if self.numel() != 1 {
            return Err(Error::Autograd(format!(
                "backward() needs a scalar, got shape {:?}; use backward_with(grad)",
                self.shape()
            )));
        }
        let one = Tensor::full_on(self.shape(), 1.0, self.dtype(), self.device())?;
        self.backward_with(&one)
    }

    /// Backward with a given upstream gradient (same shape as `self`).
    pub fn backward_with(&self, grad: &Tensor) -> Result<()> {
        let leaves = run_backward(self, grad.clone())?;
        let _g = NoGradGuard::new();
        for (_, (leaf, g)) in leaves {
            let total = match leaf.grad() {
                None => g,
                Some(prev) => prev.add(&g)?,
            };
            leaf.set_grad(Some(total));
        }
        Ok(())
    }
}

/// Gradients of `output` (seeded with `grad`, or 1 for a scalar) with respect to `wrt` only,
/// returned rather than accumulated into `.grad()`. None for a leaf the output does not
/// depend on. Frees the graph like `backward`.
pub fn grad(
    output: &Tensor,
    grad: Option<&Tensor>,
    wrt: &[&Tensor],
) -> Result<Vec<Option<Tensor>>> {
    let seed = match grad {
        Some(g) => g.clone(),
        None => {
            if output.numel() != 1 {
                return Err(Error::Autograd(format!(
                    "grad() without an upstream gradient needs a scalar, got {:?}",
                    output.shape()
                )));
            }
            Tensor::full_on(output.shape(), 1.0, output.dtype(), output.device())?
        }
    };
    let mut leaves = run_backward(output, seed)?;
    Ok(wrt
        .iter()
        .map(|t| leaves.remove(&t.id()).map(|(_, g)| g))
        .collect())
}

/// Activation checkpointing: `f(inputs, params)` computed without keeping its intermediate
/// tensors; the backward computes it again, with a graph over detached copies of `inputs`
/// and `params`, and backpropagates the outputs' gradients through that. Memory: the inputs
/// instead of everything `f` saves for its backward; time: one more forward of `f`.
///
/// `params` are the tensors needing gradients that `f` uses besides its inputs (a layer's
/// weights): they get their gradients through this node, so they must be passed, not
/// captured; a captured one is an error at the backward. `f` must compute the same values
/// both times (no randomness).
pub fn checkpoint(
    inputs: &[&Tensor],
    params: &[&Tensor],
    f: impl Fn(&[Tensor], &[Tensor]) -> Result<Vec<Tensor>> + Send + Sync + 'static,
) -> Result<Vec<Tensor>> {
    let all: Vec<&Tensor> = inputs.iter().chain(params).copied().collect();
    let owned = |ts: &[&Tensor]| ts.iter().map(|t| (*t).clone()).collect::<Vec<_>>();
    if !needs_grad(&all) {
        return f(&owned(inputs), &owned(params));
    }
    let saved: Vec<Tensor> = all.iter().map(|t| t.detach()).collect();
    let n_in = inputs.len();
    let outs = no_grad(|| f(&saved[..n_in], &saved[n_in..]))?;
    let want: Vec<bool> = all.iter().map(|t| t.requires_grad()).collect();
    Ok(record_many("checkpoint", outs, &all, move |gs| {
        let _g = GradMode::set(true);
        let xs: Vec<Tensor> = saved
            .iter()
            .zip(&want)
            .map(|(t, &w)| {
                if w {
                    t.detach().requires_grad_()
                } else {
                    t.clone()
                }
            })
            .collect();
        let outs = f(&xs[..n_in], &xs[n_in..])?;
        if outs.len() != gs.len() {
            return Err(Error::Autograd(format!(
                "checkpoint: the recomputation gave {} outputs, the forward {}",
                outs.len(),
                gs.len()
            )));
        }
        let roots: Vec<(Tensor, Tensor)> = outs
            .iter()
            .zip(gs)
            .filter_map(|(o, g)| g.clone().map(|g| (o.clone(), g)))
            .collect();
        let mut leaves = run_backward_many(&roots)?;
        let grads = xs
            .iter()
            .zip(&want)
            .map(|(x, &w)| w.then(|| leaves.remove(&x.id()).map(|(_, g)| g)).flatten())
            .collect();
        if let Some((l, _)) = leaves.values().next() {
            return Err(Error::Autograd(format!(
                "checkpoint: the function used a tensor that needs gradients ({:?} {}) and is \
                 neither among its inputs nor its params",
                l.shape(),
                l.dtype()
            )));
        }
        Ok(grads)
    }))
}
