//! Kernels of the ai.onnx.ml domain: LabelEncoder (opsets 1-4), TreeEnsemble (opset 5),
//! TreeEnsembleRegressor (opsets 1, 3), ArrayFeatureExtractor, Binarizer.
//!
//! Tree ensembles of both encodings are flattened into one `Forest` (interior nodes pointing at
//! nodes or leaves, leaves owning a run of (target, weight) contributions) so that a single
//! evaluator serves both.

use std::collections::HashMap;
use std::ops::Range;

use kiln_runtime::{DType, Error, Result, Tensor};

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use super::shape::{with_item, Item};
use crate::cpu::util::real_tensor;
use crate::with_real;

const DOMAIN: &str = "ai.onnx.ml";

pub fn register(r: &mut Registry) {
    r.add_in(DOMAIN, "LabelEncoder", label_encoder);
    r.add_in(DOMAIN, "TreeEnsemble", tree_ensemble);
    r.add_in(DOMAIN, "TreeEnsembleRegressor", tree_ensemble_regressor);
    r.add_in(DOMAIN, "ArrayFeatureExtractor", array_feature_extractor);
    r.add_in(DOMAIN, "Binarizer", binarizer);
}

// ---------------------------------------------------------------------------------------------
// LabelEncoder
// ---------------------------------------------------------------------------------------------

/// Look-up keys, in the kind the input's elements are compared as.
enum Keys {
    Str(Vec<String>),
    Int(Vec<i64>),
    Float(Vec<f64>),
}

/// Mapped-to values and the default for missing keys. Numeric values are kept as a tensor of the
/// output dtype (with a one-element default tensor of the same dtype).
enum Values {
    Str(Vec<String>, String),
    Num(Tensor, Tensor),
}

impl Values {
    fn len(&self) -> usize {
        match self {
            Values::Str(v, _) => v.len(),
            Values::Num(t, _) => t.len(),
        }
    }
}

/// A float as a hash key: every NaN is one key, and -0 equals +0.
fn float_key(v: f64) -> u64 {
    if v.is_nan() {
        f64::NAN.to_bits()
    } else if v == 0.0 {
        0
    } else {
        v.to_bits()
    }
}

fn keys_of_tensor(t: &Tensor) -> Result<Keys> {
    Ok(match t.dtype() {
        DType::String => Keys::Str(t.strings()?.to_vec()),
        d if d.is_float() => Keys::Float(t.to_f64_vec()?),
        _ => Keys::Int(t.to_i64_vec()?),
    })
}

fn encoder_keys(ctx: &OpCtx) -> Result<Keys> {
    if let Some(t) = ctx.attr_tensor("keys_tensor")? {
        return keys_of_tensor(&t);
    }
    if let Some(v) = ctx.attr_strings("keys_strings") {
        return Ok(Keys::Str(v));
    }
    if let Some(v) = ctx.attr_ints("keys_int64s") {
        return Ok(Keys::Int(v));
    }
    if let Some(v) = ctx.attr_floats("keys_floats") {
        return Ok(Keys::Float(v.into_iter().map(|x| x as f64).collect()));
    }
    Err(Error::Other("LabelEncoder needs one of the keys_* attributes".into()))
}

/// The default of a values tensor's dtype when default_tensor is absent.
fn default_for(dtype: DType) -> Result<Tensor> {
    Ok(match dtype {
        DType::String => Tensor::from_strings(&[1], vec!["_Unused".into()])?,
        d if d.is_float() => with_real!(d, R, {
            real_tensor(d, &[1], vec![<R as crate::cpu::util::Real>::from_f64(-0.0)])?
        }),
        d => int_tensor(d, &[1], &[-1])?,
    })
}

fn encoder_values(ctx: &OpCtx) -> Result<Values> {
    let default_string = || ctx.attr_s("default_string", "_Unused");
    if let Some(t) = ctx.attr_tensor("values_tensor")? {
        let default = match ctx.attr_tensor("default_tensor")? {
            Some(d) if d.dtype() == t.dtype() && d.len() == 1 => d,
            Some(d) => {
                return Err(Error::DType(format!(
                    "LabelEncoder default_tensor ({} {:?}) must be one {} element",
                    d.dtype(),
                    d.shape(),
                    t.dtype()
                )))
            }
            None => default_for(t.dtype())?,
        };
        return Ok(if t.dtype() == DType::String {
            Values::Str(t.strings()?.to_vec(), default.strings()?[0].clone())
        } else {
            Values::Num(t, default)
        });
    }
    if let Some(v) = ctx.attr_strings("values_strings") {
        return Ok(Values::Str(v, default_string()));
    }
    if let Some(v) = ctx.attr_ints("values_int64s") {
        let n = v.len();
        let d = Tensor::from_vec(&[1], vec![ctx.attr_i("default_int64", -1)])?;
        return Ok(Values::Num(Tensor::from_vec(&[n], v)?, d));
    }
    if let Some(v) = ctx.attr_floats("values_floats") {
        let n = v.len();
        let d = Tensor::from_vec(&[1], vec![ctx.attr_f("default_float", -0.0)])?;
        return Ok(Values::Num(Tensor::from_vec(&[n], v)?, d));
    }
    Err(Error::Other("LabelEncoder needs one of the values_* attributes".into()))
}

/// Opset 1: strings map to their index in classes_strings, int64s to the class at that index.
fn encoder_v1(ctx: &OpCtx, x: &Tensor) -> Result<(Keys, Values)> {
    let classes = ctx.attr_strings("classes_strings").unwrap_or_default();
    let n = classes.len();
    if x.dtype() == DType::String {
        let idx: Vec<i64> = (0..n as i64).collect();
        let d = Tensor::from_vec(&[1], vec![ctx.attr_i("default_int64", -1)])?;
        Ok((Keys::Str(classes), Values::Num(Tensor::from_vec(&[n], idx)?, d)))
    } else {
        let keys = Keys::Int((0..n as i64).collect());
        Ok((keys, Values::Str(classes, ctx.attr_s("default_string", "_Unused"))))
    }
}

/// For each input element, the index of its key in the key list. A repeated key resolves to its
/// last occurrence (opset 4 says so) or, before that, its first (as onnxruntime does).
fn key_positions(keys: &Keys, x: &Tensor, last_wins: bool) -> Result<Vec<Option<usize>>> {
    fn positions<K: std::hash::Hash + Eq>(keys: Vec<K>, last_wins: bool) -> HashMap<K, usize> {
        let mut map = HashMap::with_capacity(keys.len());
        for (i, k) in keys.into_iter().enumerate() {
            if last_wins {
                map.insert(k, i);
            } else {
                map.entry(k).or_insert(i);
            }
        }
        map
    }
    let mismatch = || Error::DType(format!("LabelEncoder input {} does not match the keys' type", x.dtype()));
    Ok(match keys {
        Keys::Str(k) => {
            if x.dtype() != DType::String {
                return Err(mismatch());
            }
            let map = positions(k.iter().map(String::as_str).collect(), last_wins);
            x.strings()?.iter().map(|s| map.get(s.as_str()).copied()).collect()
        }
        Keys::Int(k) => {
            if !x.dtype().is_int() {
                return Err(mismatch());
            }
            let map = positions(k.clone(), last_wins);
            x.to_i64_vec()?.iter().map(|v| map.get(v).copied()).collect()
        }
        Keys::Float(k) => {
            if !x.dtype().is_float() {
                return Err(mismatch());
            }
            let map = positions(k.iter().map(|&v| float_key(v)).collect(), last_wins);
            x.to_f64_vec()?.iter().map(|&v| map.get(&float_key(v)).copied()).collect()
        }
    })
}

fn label_encoder(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (keys, values) = if ctx.opset() <= 1 {
        encoder_v1(ctx, x)?
    } else {
        (encoder_keys(ctx)?, encoder_values(ctx)?)
    };
    let nkeys = match &keys {
        Keys::Str(k) => k.len(),
        Keys::Int(k) => k.len(),
        Keys::Float(k) => k.len(),
    };
    if nkeys != values.len() {
        return Err(Error::Shape(format!(
            "LabelEncoder has {nkeys} keys but {} values",
            values.len()
        )));
    }
    let pos = key_positions(&keys, x, ctx.opset() >= 4)?;
    let out = match values {
        Values::Str(v, d) => {
            let s = pos.iter().map(|p| p.map_or_else(|| d.clone(), |i| v[i].clone())).collect();
            Tensor::from_strings(x.shape(), s)?
        }
        Values::Num(v, d) => with_item!(v.dtype(), T, {
            let (vals, def) = (T::items(&v)?, &T::items(&d)?[0]);
            T::build(v.dtype(), x.shape(), |out| {
                for (o, p) in out.iter_mut().zip(&pos) {
                    o.clone_from(p.map_or(def, |i| &vals[i]));
                }
                Ok(())
            })?
        }),
    };
    Ok(vec![out])
}

// ---------------------------------------------------------------------------------------------
// Tree ensembles
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Member,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Next {
    Node(usize),
    Leaf(usize),
}

struct Branch {
    mode: Mode,
    feature: usize,
    split: f64,
    /// Range into `Forest::members` (BRANCH_MEMBER nodes only).
    members: Range<usize>,
    missing_true: bool,
    on_true: Next,
    on_false: Next,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Aggregate {
    Average,
    Sum,
    Min,
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum PostTransform {
    None,
    Softmax,
    Logistic,
    SoftmaxZero,
}

struct Forest {
    branches: Vec<Branch>,
    members: Vec<f64>,
    /// Each leaf's run of `contributions`.
    leaves: Vec<Range<usize>>,
    /// (target, weight) pairs.
    contributions: Vec<(usize, f64)>,
    roots: Vec<Next>,
    n_targets: usize,
    n_features: usize,
}

impl Branch {
    fn goes_true(&self, x: f64, members: &[f64]) -> bool {
        if self.missing_true && x.is_nan() {
            return true;
        }
        match self.mode {
            Mode::Leq => x <= self.split,
            Mode::Lt => x < self.split,
            Mode::Gte => x >= self.split,
            Mode::Gt => x > self.split,
            Mode::Eq => x == self.split,
            Mode::Neq => x != self.split,
            Mode::Member => members[self.members.clone()].contains(&x),
        }
    }
}

impl Forest {
    /// Check every reference so evaluation can index without failing.
    fn validate(&self) -> Result<()> {
        let ok = |n: &Next| match *n {
            Next::Node(i) => i < self.branches.len(),
            Next::Leaf(i) => i < self.leaves.len(),
        };
        let bad = self.roots.iter().any(|r| !ok(r))
            || self.branches.iter().any(|b| !ok(&b.on_true) || !ok(&b.on_false))
            || self.contributions.iter().any(|&(t, _)| t >= self.n_targets);
        if bad {
            return Err(Error::Other("tree ensemble refers to a node, leaf or target that does not exist".into()));
        }
        Ok(())
    }

    /// The leaf one row reaches from `root`.
    fn leaf(&self, root: Next, row: &[f64]) -> Result<usize> {
        let mut at = root;
        // A well-formed tree never revisits a node; bound the walk to reject cyclic ones.
        for _ in 0..=self.branches.len() {
            match at {
                Next::Leaf(l) => return Ok(l),
                Next::Node(i) => {
                    let b = &self.branches[i];
                    at = if b.goes_true(row[b.feature], &self.members) { b.on_true } else { b.on_false };
                }
            }
        }
        Err(Error::Other("tree ensemble contains a cycle".into()))
    }

    /// Aggregated scores of one row into `out` (n_targets values).
    fn score_row(&self, row: &[f64], agg: Aggregate, init: f64, out: &mut [f64]) -> Result<()> {
        out.fill(init);
        for &root in &self.roots {
            let leaf = self.leaf(root, row)?;
            for &(t, w) in &self.contributions[self.leaves[leaf].clone()] {
                let o = &mut out[t];
                *o = match agg {
                    Aggregate::Sum | Aggregate::Average => *o + w,
                    Aggregate::Min => o.min(w),
                    Aggregate::Max => o.max(w),
                };
            }
        }
        if agg == Aggregate::Average && !self.roots.is_empty() {
            let n = self.roots.len() as f64;
            out.iter_mut().for_each(|o| *o /= n);
        }
        Ok(())
    }

    /// Scores of every row of `x` ([N, F], or [F] as one row), row-major [N, n_targets].
    fn predict(&self, x: &Tensor, agg: Aggregate, init: f64) -> Result<(usize, Vec<f64>)> {
        let (n, f) = match *x.shape() {
            [n, f] => (n, f),
            [f] => (1, f),
            _ => return Err(Error::Shape(format!("tree ensemble input must be [N, F], got {:?}", x.shape()))),
        };
        if f < self.n_features {
            return Err(Error::Shape(format!(
                "tree ensemble reads feature {} but the input has {f}",
                self.n_features - 1
            )));
        }
        let data = x.to_f64_vec()?;
        let mut out = vec![0.0; n * self.n_targets];
        if self.n_targets > 0 {
            let f = f.max(1);
            crate::cpu::par::try_chunks_mut(&mut out, self.n_targets, |r, o| self.score_row(&data[r * f..(r + 1) * f], agg, init, o))?;
        }
        Ok((n, out))
    }
}

fn apply_post_transform(pt: PostTransform, scores: &mut [f64], n_targets: usize) {
    if n_targets == 0 {
        return;
    }
    match pt {
        PostTransform::None => {}
        PostTransform::Logistic => scores.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
        PostTransform::Softmax | PostTransform::SoftmaxZero => {
            let skip_zero = pt == PostTransform::SoftmaxZero;
            for row in scores.chunks_mut(n_targets) {
                let live = |v: f64| !(skip_zero && v == 0.0);
                let max = row.iter().copied().filter(|&v| live(v)).fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for v in row.iter_mut().filter(|v| live(**v)) {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                for v in row.iter_mut() {
                    if sum > 0.0 && (!skip_zero || *v != 0.0) {
                        *v /= sum;
                    }
                }
            }
        }
    }
}

fn required_ints(ctx: &OpCtx, name: &str) -> Result<Vec<i64>> {
    ctx.attr_ints(name).ok_or_else(|| Error::Other(format!("{} requires attribute {name}", ctx.op())))
}

fn required_tensor(ctx: &OpCtx, name: &str) -> Result<Tensor> {
    ctx.attr_tensor(name)?.ok_or_else(|| Error::Other(format!("{} requires attribute {name}", ctx.op())))
}

fn index(v: i64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::Other(format!("tree ensemble {what} {v} is negative")))
}

/// The opset-5 TreeEnsemble encoding: nodes_* interior nodes, leaf_* leaves.
fn forest_v5(ctx: &OpCtx) -> Result<Forest> {
    let features = required_ints(ctx, "nodes_featureids")?;
    let splits = required_tensor(ctx, "nodes_splits")?.to_f64_vec()?;
    let modes = required_tensor(ctx, "nodes_modes")?.to_i64_vec()?;
    let true_ids = required_ints(ctx, "nodes_truenodeids")?;
    let false_ids = required_ints(ctx, "nodes_falsenodeids")?;
    let true_leafs = required_ints(ctx, "nodes_trueleafs")?;
    let false_leafs = required_ints(ctx, "nodes_falseleafs")?;
    let missing = ctx.attr_ints("nodes_missing_value_tracks_true");
    let roots = required_ints(ctx, "tree_roots")?;
    let targets = required_ints(ctx, "leaf_targetids")?;
    let weights = required_tensor(ctx, "leaf_weights")?.to_f64_vec()?;
    let membership = match ctx.attr_tensor("membership_values")? {
        Some(t) => t.to_f64_vec()?,
        None => Vec::new(),
    };
    let n = features.len();
    let lens = [splits.len(), modes.len(), true_ids.len(), false_ids.len(), true_leafs.len(), false_leafs.len()];
    if lens.iter().any(|&l| l != n) || missing.as_ref().is_some_and(|m| m.len() != n) {
        return Err(Error::Shape("TreeEnsemble nodes_* attributes differ in length".into()));
    }
    if targets.len() != weights.len() {
        return Err(Error::Shape("TreeEnsemble leaf_* attributes differ in length".into()));
    }
    // Member sets are NaN-delimited, in the order the member nodes appear in nodes_modes.
    let mut sets = membership.split(|v| v.is_nan());
    let mut members = Vec::new();
    let mut branches = Vec::with_capacity(n);
    for i in 0..n {
        let mode = match modes[i] {
            0 => Mode::Leq,
            1 => Mode::Lt,
            2 => Mode::Gte,
            3 => Mode::Gt,
            4 => Mode::Eq,
            5 => Mode::Neq,
            6 => Mode::Member,
            m => return Err(ctx.unsupported(format!("node mode {m}"))),
        };
        let start = members.len();
        if mode == Mode::Member {
            let set = sets.next().ok_or_else(|| {
                Error::Other("TreeEnsemble has fewer membership sets than BRANCH_MEMBER nodes".into())
            })?;
            members.extend_from_slice(set);
        }
        let next = |leaf: i64, id: i64| -> Result<Next> {
            let id = index(id, "node id")?;
            Ok(if leaf != 0 { Next::Leaf(id) } else { Next::Node(id) })
        };
        branches.push(Branch {
            mode,
            feature: index(features[i], "feature id")?,
            split: splits[i],
            members: start..members.len(),
            missing_true: missing.as_ref().is_some_and(|m| m[i] != 0),
            on_true: next(true_leafs[i], true_ids[i])?,
            on_false: next(false_leafs[i], false_ids[i])?,
        });
    }
    let roots = roots
        .iter()
        .map(|&r| {
            let r = index(r, "tree root")?;
            // A one-leaf tree is a node whose branches both name the same leaf.
            Ok(match branches.get(r) {
                Some(b) if b.on_true == b.on_false && matches!(b.on_true, Next::Leaf(_)) => b.on_true,
                _ => Next::Node(r),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let contributions = targets
        .iter()
        .zip(&weights)
        .map(|(&t, &w)| Ok((index(t, "target id")?, w)))
        .collect::<Result<Vec<_>>>()?;
    let n_targets = match ctx.attr_i_opt("n_targets") {
        Some(t) => index(t, "n_targets")?,
        None => contributions.iter().map(|c| c.0 + 1).max().unwrap_or(0),
    };
    let forest = Forest {
        n_features: branches.iter().map(|b| b.feature + 1).max().unwrap_or(0),
        branches,
        members,
        leaves: (0..contributions.len()).map(|i| i..i + 1).collect(),
        contributions,
        roots,
        n_targets,
    };
    forest.validate()?;
    Ok(forest)
}

fn tree_ensemble(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let forest = forest_v5(ctx)?;
    let agg = match ctx.attr_i("aggregate_function", 1) {
        0 => Aggregate::Average,
        1 => Aggregate::Sum,
        2 => Aggregate::Min,
        3 => Aggregate::Max,
        a => return Err(ctx.unsupported(format!("aggregate_function {a}"))),
    };
    let pt = match ctx.attr_i("post_transform", 0) {
        0 => PostTransform::None,
        1 => PostTransform::Softmax,
        2 => PostTransform::Logistic,
        3 => PostTransform::SoftmaxZero,
        p => return Err(ctx.unsupported(format!("post_transform {p}"))),
    };
    with_real!(x.dtype(), R, {
        // Targets no leaf reaches keep the initial value: the dtype's extreme for MIN/MAX.
        let extreme = match x.dtype() {
            DType::F64 => f64::MAX,
            DType::F16 => half::f16::MAX.to_f64(),
            DType::BF16 => half::bf16::MAX.to_f64(),
            _ => f32::MAX as f64,
        };
        let init = match agg {
            Aggregate::Min => extreme,
            Aggregate::Max => -extreme,
            _ => 0.0,
        };
        let (n, mut scores) = forest.predict(x, agg, init)?;
        apply_post_transform(pt, &mut scores, forest.n_targets);
        let out: Vec<R> = scores.into_iter().map(<R as crate::cpu::util::Real>::from_f64).collect();
        Ok(vec![real_tensor(x.dtype(), &[n, forest.n_targets], out)?])
    })
}

/// The opset-1/3 TreeEnsembleRegressor encoding: nodes keyed by (tree id, node id), leaves are
/// nodes with mode LEAF, and target_* entries attach weighted targets to leaves.
fn forest_v1(ctx: &OpCtx) -> Result<Forest> {
    let tree_ids = required_ints(ctx, "nodes_treeids")?;
    let node_ids = required_ints(ctx, "nodes_nodeids")?;
    let features = required_ints(ctx, "nodes_featureids")?;
    let modes = ctx
        .attr_strings("nodes_modes")
        .ok_or_else(|| Error::Other("TreeEnsembleRegressor requires nodes_modes".into()))?;
    let splits = match ctx.attr_tensor("nodes_values_as_tensor")? {
        Some(t) => t.to_f64_vec()?,
        None => ctx.attr_floats("nodes_values").unwrap_or_default().into_iter().map(|v| v as f64).collect(),
    };
    let true_ids = required_ints(ctx, "nodes_truenodeids")?;
    let false_ids = required_ints(ctx, "nodes_falsenodeids")?;
    let missing = ctx.attr_ints("nodes_missing_value_tracks_true");
    let t_tree = required_ints(ctx, "target_treeids")?;
    let t_node = required_ints(ctx, "target_nodeids")?;
    let t_id = required_ints(ctx, "target_ids")?;
    let t_w = match ctx.attr_tensor("target_weights_as_tensor")? {
        Some(t) => t.to_f64_vec()?,
        None => ctx.attr_floats("target_weights").unwrap_or_default().into_iter().map(|v| v as f64).collect(),
    };
    let n = tree_ids.len();
    let lens = [node_ids.len(), features.len(), modes.len(), splits.len(), true_ids.len(), false_ids.len()];
    if lens.iter().any(|&l| l != n) || missing.as_ref().is_some_and(|m| m.len() != n) {
        return Err(Error::Shape("TreeEnsembleRegressor nodes_* attributes differ in length".into()));
    }
    if [t_node.len(), t_id.len(), t_w.len()].iter().any(|&l| l != t_tree.len()) {
        return Err(Error::Shape("TreeEnsembleRegressor target_* attributes differ in length".into()));
    }
    // Leaves get their own numbering; interior nodes keep their position among non-leaves.
    let mut slot: HashMap<(i64, i64), Next> = HashMap::new();
    let (mut n_branch, mut n_leaf) = (0, 0);
    for i in 0..n {
        let next = if modes[i] == "LEAF" {
            n_leaf += 1;
            Next::Leaf(n_leaf - 1)
        } else {
            n_branch += 1;
            Next::Node(n_branch - 1)
        };
        slot.insert((tree_ids[i], node_ids[i]), next);
    }
    let lookup = |tree: i64, node: i64| {
        slot.get(&(tree, node)).copied().ok_or_else(|| {
            Error::Other(format!("TreeEnsembleRegressor has no node {node} in tree {tree}"))
        })
    };
    let mut branches = Vec::with_capacity(n_branch);
    let mut roots: Vec<(i64, Next)> = Vec::new();
    for i in 0..n {
        let mode = match modes[i].as_str() {
            "LEAF" => None,
            "BRANCH_LEQ" => Some(Mode::Leq),
            "BRANCH_LT" => Some(Mode::Lt),
            "BRANCH_GTE" => Some(Mode::Gte),
            "BRANCH_GT" => Some(Mode::Gt),
            "BRANCH_EQ" => Some(Mode::Eq),
            "BRANCH_NEQ" => Some(Mode::Neq),
            m => return Err(ctx.unsupported(format!("node mode {m}"))),
        };
        // A tree's root is its first listed node.
        if !roots.iter().any(|r| r.0 == tree_ids[i]) {
            roots.push((tree_ids[i], lookup(tree_ids[i], node_ids[i])?));
        }
        let Some(mode) = mode else { continue };
        branches.push(Branch {
            mode,
            feature: index(features[i], "feature id")?,
            split: splits[i],
            members: 0..0,
            missing_true: missing.as_ref().is_some_and(|m| m[i] != 0),
            on_true: lookup(tree_ids[i], true_ids[i])?,
            on_false: lookup(tree_ids[i], false_ids[i])?,
        });
    }
    let mut per_leaf: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n_leaf];
    for k in 0..t_tree.len() {
        match lookup(t_tree[k], t_node[k])? {
            Next::Leaf(l) => per_leaf[l].push((index(t_id[k], "target id")?, t_w[k])),
            Next::Node(_) => return Err(Error::Other("TreeEnsembleRegressor target on an interior node".into())),
        }
    }
    let mut leaves = Vec::with_capacity(n_leaf);
    let mut contributions = Vec::new();
    for c in per_leaf {
        leaves.push(contributions.len()..contributions.len() + c.len());
        contributions.extend(c);
    }
    let n_targets = index(ctx.attr_i("n_targets", 1), "n_targets")?;
    let forest = Forest {
        n_features: branches.iter().map(|b| b.feature + 1).max().unwrap_or(0),
        branches,
        members: Vec::new(),
        leaves,
        contributions,
        roots: roots.into_iter().map(|r| r.1).collect(),
        n_targets,
    };
    forest.validate()?;
    Ok(forest)
}

fn tree_ensemble_regressor(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let forest = forest_v1(ctx)?;
    let agg = match ctx.attr_s("aggregate_function", "SUM").as_str() {
        "AVERAGE" => Aggregate::Average,
        "SUM" => Aggregate::Sum,
        "MIN" => Aggregate::Min,
        "MAX" => Aggregate::Max,
        a => return Err(ctx.unsupported(format!("aggregate_function {a}"))),
    };
    let pt = match ctx.attr_s("post_transform", "NONE").as_str() {
        "NONE" => PostTransform::None,
        "SOFTMAX" => PostTransform::Softmax,
        "LOGISTIC" => PostTransform::Logistic,
        "SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
        p => return Err(ctx.unsupported(format!("post_transform {p}"))),
    };
    let base = match ctx.attr_tensor("base_values_as_tensor")? {
        Some(t) => t.to_f64_vec()?,
        None => ctx.attr_floats("base_values").unwrap_or_default().into_iter().map(|v| v as f64).collect(),
    };
    if !base.is_empty() && base.len() != forest.n_targets {
        return Err(Error::Shape("TreeEnsembleRegressor base_values must have n_targets entries".into()));
    }
    // Targets no leaf reaches score 0 under MIN/MAX as well.
    let init = match agg {
        Aggregate::Min => f64::INFINITY,
        Aggregate::Max => f64::NEG_INFINITY,
        _ => 0.0,
    };
    let (n, mut scores) = forest.predict(x, agg, init)?;
    if forest.n_targets > 0 {
        for row in scores.chunks_mut(forest.n_targets) {
            for (t, v) in row.iter_mut().enumerate() {
                if init.is_infinite() && *v == init {
                    *v = 0.0;
                }
                *v += base.get(t).copied().unwrap_or(0.0);
            }
        }
    }
    apply_post_transform(pt, &mut scores, forest.n_targets);
    let out: Vec<f32> = scores.into_iter().map(|v| v as f32).collect();
    Ok(vec![Tensor::from_vec(&[n, forest.n_targets], out)?])
}

// ---------------------------------------------------------------------------------------------
// ArrayFeatureExtractor, Binarizer
// ---------------------------------------------------------------------------------------------

fn array_feature_extractor(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let idx = ctx.input(inputs, 1)?.to_i64_vec()?;
    let Some(&last) = x.shape().last() else {
        return Err(Error::Shape("ArrayFeatureExtractor input must have rank >= 1".into()));
    };
    let cols = idx
        .iter()
        .map(|&i| {
            usize::try_from(i).ok().filter(|&i| i < last).ok_or_else(|| {
                Error::Shape(format!("ArrayFeatureExtractor index {i} is out of range for {last} columns"))
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    // A 1-D input yields one row, as onnxruntime does.
    let mut shape = if x.rank() == 1 { vec![1] } else { x.shape()[..x.rank() - 1].to_vec() };
    shape.push(cols.len());
    let rows = x.len().checked_div(last).unwrap_or(0);
    let out = with_item!(x.dtype(), T, {
        let src = T::items(x)?;
        T::build(x.dtype(), &shape, |dst| {
            if !cols.is_empty() {
                for (r, row) in dst.chunks_mut(cols.len()).enumerate().take(rows) {
                    for (o, &c) in row.iter_mut().zip(&cols) {
                        o.clone_from(&src[r * last + c]);
                    }
                }
            }
            Ok(())
        })?
    });
    Ok(vec![out])
}

fn binarizer(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let threshold = ctx.attr_f("threshold", 0.0) as f64;
    let v: Vec<f64> = x.to_f64_vec()?.into_iter().map(|v| if v > threshold { 1.0 } else { 0.0 }).collect();
    let out = if x.dtype().is_float() {
        with_real!(x.dtype(), R, {
            let r: Vec<R> = v.into_iter().map(<R as crate::cpu::util::Real>::from_f64).collect();
            real_tensor(x.dtype(), x.shape(), r)?
        })
    } else {
        let ints: Vec<i64> = v.into_iter().map(|b| b as i64).collect();
        int_tensor(x.dtype(), x.shape(), &ints)?
    };
    Ok(vec![out])
}

/// An integer tensor of `dtype` from i64 values that fit it.
fn int_tensor(dtype: DType, shape: &[usize], v: &[i64]) -> Result<Tensor> {
    crate::with_int!(dtype, T, {
        let t: Vec<T> = v.iter().map(|&x| x as T).collect();
        Tensor::from_slice_as(dtype, shape, &t)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step, TensorData};

    fn step(op: &str, opset: i64, attrs: Vec<Attr>) -> Step {
        Step { op: op.into(), domain: DOMAIN.into(), opset, outputs: vec![0], attrs, ..Default::default() }
    }

    fn run(op: &str, opset: i64, attrs: Vec<Attr>, ins: Vec<Tensor>) -> Tensor {
        let ins: Vec<Option<Tensor>> = ins.into_iter().map(Some).collect();
        crate::cpu::eval_step(&step(op, opset, attrs), &ins).unwrap().remove(0)
    }

    fn ints(name: &str, v: &[i64]) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Ints as i32, ints: v.to_vec(), ..Default::default() }
    }

    fn int(name: &str, v: i64) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Int as i32, i: v, ..Default::default() }
    }

    fn strs(name: &str, v: &[&str]) -> Attr {
        let strings = v.iter().map(|s| s.as_bytes().to_vec()).collect();
        Attr { name: name.into(), kind: AttrKind::Strings as i32, strings, ..Default::default() }
    }

    fn floats(name: &str, v: &[f32]) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Floats as i32, floats: v.to_vec(), ..Default::default() }
    }

    fn tensor<T: kiln_runtime::Elem>(name: &str, v: &[T]) -> Attr {
        let t = Tensor::from_vec(&[v.len()], v.to_vec()).unwrap();
        let data = TensorData {
            dtype: t.dtype() as i32,
            dims: vec![v.len() as u64],
            inline: t.bytes().to_vec(),
            ..Default::default()
        };
        Attr { name: name.into(), kind: AttrKind::Tensor as i32, t: Some(data), ..Default::default() }
    }

    fn s(v: &[&str]) -> Tensor {
        Tensor::from_strings(&[v.len()], v.iter().map(|x| x.to_string()).collect()).unwrap()
    }

    #[test]
    fn label_encoder_strings_to_ints_with_default() {
        let attrs = vec![strs("keys_strings", &["a", "b"]), ints("values_int64s", &[5, 6]), int("default_int64", 9)];
        let y = run("LabelEncoder", 2, attrs, vec![s(&["b", "z", "a"])]);
        assert_eq!(y.view::<i64>().unwrap(), &[6, 9, 5]);
    }

    #[test]
    fn label_encoder_float_nan_key_and_tensor_values() {
        let attrs = vec![floats("keys_floats", &[f32::NAN, 1.5]), tensor("values_tensor", &[7i16, 8])];
        let x = Tensor::from_vec(&[3], vec![1.5f32, f32::NAN, 2.0]).unwrap();
        let y = run("LabelEncoder", 4, attrs, vec![x]);
        assert_eq!(y.dtype(), DType::I16);
        assert_eq!(y.view::<i16>().unwrap(), &[8, 7, -1]);
    }

    #[test]
    fn label_encoder_v1_both_directions() {
        let classes = strs("classes_strings", &["x", "y"]);
        let y = run("LabelEncoder", 1, vec![classes.clone()], vec![s(&["y", "q"])]);
        assert_eq!(y.view::<i64>().unwrap(), &[1, -1]);
        let x = Tensor::from_vec(&[2], vec![0i64, 5]).unwrap();
        let y = run("LabelEncoder", 1, vec![classes], vec![x]);
        assert_eq!(y.strings().unwrap(), &["x".to_string(), "_Unused".to_string()]);
    }

    /// Root: x0 <= 2 ? (x1 in {3, 4} ? leaf0 : leaf1) : leaf2.
    fn v5_attrs(agg: i64) -> Vec<Attr> {
        vec![
            ints("nodes_featureids", &[0, 1]),
            tensor("nodes_splits", &[2.0f32, 0.0]),
            tensor("nodes_modes", &[0u8, 6]),
            ints("nodes_truenodeids", &[1, 0]),
            ints("nodes_trueleafs", &[0, 1]),
            ints("nodes_falsenodeids", &[2, 1]),
            ints("nodes_falseleafs", &[1, 1]),
            tensor("membership_values", &[3.0f32, 4.0, f32::NAN]),
            ints("tree_roots", &[0]),
            ints("leaf_targetids", &[0, 1, 1]),
            tensor("leaf_weights", &[1.0f32, 2.0, 3.0]),
            int("n_targets", 2),
            int("aggregate_function", agg),
        ]
    }

    #[test]
    fn tree_ensemble_v5_modes_and_membership() {
        let x = Tensor::from_vec(&[3, 2], vec![1f32, 4., 1., 5., 7., 3.]).unwrap();
        let y = run("TreeEnsemble", 5, v5_attrs(1), vec![x]);
        assert_eq!(y.shape(), &[3, 2]);
        assert_eq!(y.view::<f32>().unwrap(), &[1., 0., 0., 2., 0., 3.]);
    }

    #[test]
    fn tree_ensemble_v5_min_leaves_untouched_targets_at_max() {
        let x = Tensor::from_vec(&[1, 2], vec![1f32, 4.]).unwrap();
        let y = run("TreeEnsemble", 5, v5_attrs(2), vec![x]);
        assert_eq!(y.view::<f32>().unwrap(), &[1., f32::MAX]);
    }

    #[test]
    fn tree_ensemble_regressor_two_trees_average() {
        // Tree 0: x0 < 0.5 ? node1 (w 2) : node2 (w 4); tree 1: a single leaf (w 6).
        let attrs = vec![
            ints("nodes_treeids", &[0, 0, 0, 1]),
            ints("nodes_nodeids", &[0, 1, 2, 0]),
            ints("nodes_featureids", &[0, 0, 0, 0]),
            strs("nodes_modes", &["BRANCH_LT", "LEAF", "LEAF", "LEAF"]),
            floats("nodes_values", &[0.5, 0., 0., 0.]),
            ints("nodes_truenodeids", &[1, 0, 0, 0]),
            ints("nodes_falsenodeids", &[2, 0, 0, 0]),
            ints("target_treeids", &[0, 0, 1]),
            ints("target_nodeids", &[1, 2, 0]),
            ints("target_ids", &[0, 0, 0]),
            floats("target_weights", &[2., 4., 6.]),
            Attr { name: "aggregate_function".into(), kind: AttrKind::String as i32, s: b"AVERAGE".to_vec(), ..Default::default() },
            floats("base_values", &[1.0]),
        ];
        let x = Tensor::from_vec(&[2, 1], vec![0f32, 1.]).unwrap();
        let y = run("TreeEnsembleRegressor", 3, attrs, vec![x]);
        assert_eq!(y.view::<f32>().unwrap(), &[5., 6.]);
    }

    #[test]
    fn array_feature_extractor_and_binarizer() {
        let x = Tensor::from_vec(&[2, 3], vec![0i64, 1, 2, 3, 4, 5]).unwrap();
        let idx = Tensor::from_vec(&[2], vec![2i64, 0]).unwrap();
        let y = run("ArrayFeatureExtractor", 1, vec![], vec![x, idx]);
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(y.view::<i64>().unwrap(), &[2, 0, 5, 3]);

        let x = Tensor::from_vec(&[3], vec![-1f32, 0.5, 2.0]).unwrap();
        let attr = Attr { name: "threshold".into(), kind: AttrKind::Float as i32, f: 0.5, ..Default::default() };
        let y = run("Binarizer", 1, vec![attr], vec![x]);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 0., 1.]);
    }
}
