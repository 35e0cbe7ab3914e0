//! Shapes of data-movement ops: Reshape, Flatten, Transpose, Squeeze/Unsqueeze, Concat, Split,
//! Slice, Gather*, Shape/Size, Expand, Tile, Pad, ConstantOfShape, Constant, Range, OneHot, TopK,
//! NonZero, Compress, Unique, DepthToSpace/SpaceToDepth, CenterCropPad, Einsum, Det.

use super::dims::{broadcast, map_fixed, norm_axis, prod_dim, product, same_dim, sum_dims, SymInt};
use super::Cx;
use crate::ir::{AttrValue, Dim};

type Shapes = Vec<Option<Vec<Dim>>>;

pub(crate) fn shapes(cx: &Cx) -> Option<Shapes> {
    let one = |s: Option<Vec<Dim>>| Some(vec![s]);
    match cx.op() {
        "Reshape" => one(reshape(cx)),
        "Flatten" => one(flatten(cx)),
        "Transpose" => one(transpose(cx)),
        "Squeeze" => one(squeeze(cx)),
        "Unsqueeze" => one(unsqueeze(cx)),
        "Concat" => one(concat(cx)),
        "Split" => Some(split(cx)),
        "Slice" => one(slice(cx)),
        "Gather" => one(gather(cx)),
        "GatherElements" => one(cx.shape(1).map(|s| s.to_vec())),
        "GatherND" => one(gather_nd(cx)),
        "Shape" => one(shape_op(cx)),
        "Size" => one(Some(vec![])),
        "Expand" => one(expand(cx)),
        "Tile" => one(tile(cx)),
        "Pad" => one(pad(cx)),
        "ConstantOfShape" => one(shape_from_input(cx, 0)),
        "Constant" => one(constant(cx)),
        "Range" => one(range(cx)),
        "OneHot" => one(one_hot(cx)),
        "TopK" => {
            let s = top_k(cx);
            Some(vec![s.clone(), s])
        }
        "NonZero" => one(cx.rank(0).map(|r| vec![Dim::Fixed(r), Dim::Unknown])),
        "Compress" => one(compress(cx)),
        "Unique" => Some(unique(cx)),
        "DepthToSpace" => one(depth_space(cx, true)),
        "SpaceToDepth" => one(depth_space(cx, false)),
        "CenterCropPad" => one(center_crop_pad(cx)),
        "Einsum" => one(einsum(cx)),
        "Det" => one(cx
            .shape(0)
            .filter(|s| s.len() >= 2)
            .map(|s| s[..s.len() - 2].to_vec())),
        _ => None,
    }
}

/// A 1-D shape-like input as dims (constant or symbolic), or as that many unknown dims.
fn shape_from_input(cx: &Cx, i: usize) -> Option<Vec<Dim>> {
    if let Some(v) = cx.sym_ints(i) {
        return Some(v.iter().map(|x| x.to_dim()).collect());
    }
    rank_of_1d(cx, i).map(|n| vec![Dim::Unknown; n])
}

/// The length of a 1-D input whose length is fixed.
fn rank_of_1d(cx: &Cx, i: usize) -> Option<usize> {
    match cx.shape(i) {
        Some([Dim::Fixed(n)]) => Some(*n),
        _ => None,
    }
}

/// Axes given as an attribute before `input_from` and as input `i` from then on.
fn axes_arg(cx: &Cx, name: &str, i: usize, input_from: i64) -> Option<Option<Vec<i64>>> {
    if cx.opset >= input_from {
        if !cx.has(i) {
            return Some(None);
        }
        cx.const_ints(i).map(Some)
    } else {
        Some(cx.attr_ints(name).map(|v| v.to_vec()))
    }
}

fn reshape(cx: &Cx) -> Option<Vec<Dim>> {
    let target = if cx.opset < 5 {
        cx.attr_ints("shape")?
            .iter()
            .map(|&v| SymInt::Int(v))
            .collect()
    } else {
        match cx.sym_ints(1) {
            Some(t) => t,
            None => return rank_of_1d(cx, 1).map(|n| vec![Dim::Unknown; n]),
        }
    };
    let allowzero = cx.attr_i("allowzero", 0) != 0;
    let inp = cx.shape(0);
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, t) in target.iter().enumerate() {
        out.push(match t {
            SymInt::Int(0) if !allowzero => {
                inp.and_then(|s| s.get(i)).cloned().unwrap_or(Dim::Unknown)
            }
            SymInt::Int(-1) => {
                infer_at = Some(i);
                Dim::Unknown
            }
            SymInt::Int(n) if *n >= 0 => Dim::Fixed(*n as usize),
            SymInt::Int(_) => return None,
            other => other.to_dim(),
        });
    }
    if let (Some(i), Some(inp)) = (infer_at, inp) {
        let rest: Vec<Dim> = out
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != i)
            .map(|(_, d)| d.clone())
            .collect();
        out[i] = product(inp).div(&product(&rest));
    }
    Some(out)
}

fn flatten(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let axis = cx.attr_i("axis", 1);
    let axis = if axis < 0 {
        axis + s.len() as i64
    } else {
        axis
    };
    if !(0..=s.len() as i64).contains(&axis) {
        return None;
    }
    let (a, b) = s.split_at(axis as usize);
    Some(vec![prod_dim(a), prod_dim(b)])
}

fn transpose(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    match cx.attr_ints("perm") {
        Some(p) => p
            .iter()
            .map(|&a| norm_axis(a, s.len()).map(|a| s[a].clone()))
            .collect(),
        None => Some(s.iter().rev().cloned().collect()),
    }
}

fn squeeze(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let axes = axes_arg(cx, "axes", 1, 13)?;
    match axes {
        Some(axes) => {
            let axes: Option<Vec<usize>> = axes.iter().map(|&a| norm_axis(a, s.len())).collect();
            let axes = axes?;
            Some(
                s.iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, d)| d.clone())
                    .collect(),
            )
        }
        // Which dims are 1 is only known when every dim is.
        None if s.iter().all(|d| matches!(d, Dim::Fixed(_))) => {
            Some(s.iter().filter(|d| **d != Dim::Fixed(1)).cloned().collect())
        }
        None => None,
    }
}

fn unsqueeze(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let axes = axes_arg(cx, "axes", 1, 13)??;
    let rank = s.len() + axes.len();
    let mut axes: Vec<usize> = axes
        .iter()
        .map(|&a| norm_axis(a, rank))
        .collect::<Option<_>>()?;
    axes.sort_unstable();
    let mut rest = s.iter();
    (0..rank)
        .map(|i| {
            if axes.contains(&i) {
                Some(Dim::Fixed(1))
            } else {
                rest.next().cloned()
            }
        })
        .collect()
}

fn concat(cx: &Cx) -> Option<Vec<Dim>> {
    let shapes: Vec<&[Dim]> = (0..cx.n_in()).map(|i| cx.shape(i)).collect::<Option<_>>()?;
    let first = shapes.first()?;
    let rank = first.len();
    if shapes.iter().any(|s| s.len() != rank) {
        return None;
    }
    let axis = norm_axis(cx.attr_i("axis", 0), rank)?;
    Some(
        (0..rank)
            .map(|d| {
                if d == axis {
                    sum_dims(&shapes.iter().map(|s| &s[d]).collect::<Vec<_>>())
                } else {
                    shapes
                        .iter()
                        .skip(1)
                        .fold(first[d].clone(), |acc, s| same_dim(&acc, &s[d]))
                }
            })
            .collect(),
    )
}

fn split(cx: &Cx) -> Shapes {
    let n = cx.n_out();
    let Some(s) = cx.shape(0) else {
        return vec![None; n];
    };
    let Some(axis) = norm_axis(cx.attr_i("axis", 0), s.len()) else {
        return vec![None; n];
    };
    let with = |d: Dim| {
        let mut o = s.to_vec();
        o[axis] = d;
        Some(o)
    };
    let sizes: Option<Vec<i64>> = if cx.opset >= 13 {
        if cx.has(1) {
            match cx.const_ints(1) {
                Some(v) => Some(v),
                None => return vec![with(Dim::Unknown); n],
            }
        } else {
            None
        }
    } else {
        cx.attr_ints("split").map(|v| v.to_vec())
    };
    if let Some(sizes) = sizes {
        return (0..n)
            .map(|k| {
                with(
                    sizes
                        .get(k)
                        .map_or(Dim::Unknown, |&v| Dim::Fixed(v.max(0) as usize)),
                )
            })
            .collect();
    }
    let Dim::Fixed(total) = s[axis] else {
        return vec![with(Dim::Unknown); n];
    };
    let parts = if cx.opset >= 18 {
        cx.attr_i("num_outputs", n as i64).max(1) as usize
    } else {
        n
    };
    let chunk = total.div_ceil(parts.max(1));
    (0..n)
        .map(|k| {
            if cx.opset >= 18 {
                with(Dim::Fixed(chunk.min(total.saturating_sub(chunk * k))))
            } else if total % parts.max(1) == 0 {
                with(Dim::Fixed(total / parts.max(1)))
            } else {
                with(Dim::Unknown)
            }
        })
        .collect()
}

/// Length of `[start:end:step]` over a dim of size `d`, as the ONNX spec clamps it.
pub(crate) fn slice_len(d: i64, start: i64, end: i64, step: i64) -> i64 {
    if step == 0 {
        return 0;
    }
    let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
    if step > 0 {
        let s = norm(start).clamp(0, d);
        let e = norm(end).clamp(0, d);
        if e <= s {
            0
        } else {
            (e - s + step - 1) / step
        }
    } else {
        let s = norm(start).clamp(0, d - 1);
        let e = norm(end).clamp(-1, d - 1);
        if s <= e {
            0
        } else {
            (s - e + (-step) - 1) / (-step)
        }
    }
}

fn slice(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let (starts, ends, axes, steps) = if cx.opset < 10 {
        let get = |n: &str| {
            cx.attr_ints(n)
                .map(|v| v.iter().map(|&x| SymInt::Int(x)).collect::<Vec<_>>())
        };
        (
            get("starts"),
            get("ends"),
            cx.attr_ints("axes").map(|v| v.to_vec()),
            None,
        )
    } else {
        let unknown = |i: usize| cx.has(i) && cx.const_ints(i).is_none();
        if unknown(3) || unknown(4) {
            return Some(vec![Dim::Unknown; s.len()]);
        }
        (
            cx.sym_ints(1),
            cx.sym_ints(2),
            cx.const_ints(3),
            cx.const_ints(4),
        )
    };
    let axes: Vec<usize> = match &axes {
        Some(a) => a
            .iter()
            .map(|&x| norm_axis(x, s.len()))
            .collect::<Option<_>>()?,
        None => (0..starts
            .as_ref()
            .or(ends.as_ref())
            .map_or(s.len(), |v| v.len()))
            .collect(),
    };
    let mut out = s.to_vec();
    let (Some(starts), Some(ends)) = (starts, ends) else {
        for &a in &axes {
            out[a] = Dim::Unknown;
        }
        return Some(out);
    };
    for (k, &a) in axes.iter().enumerate() {
        let step = steps.as_ref().and_then(|v| v.get(k).copied()).unwrap_or(1);
        let (start, end) = (starts.get(k)?, ends.get(k)?);
        out[a] = match (&s[a], start, end) {
            (Dim::Fixed(d), SymInt::Int(b), SymInt::Int(e)) => {
                Dim::Fixed(slice_len(*d as i64, *b, *e, step).max(0) as usize)
            }
            // The whole of a symbolic dim.
            (d, SymInt::Int(0), SymInt::Int(e)) if step == 1 && *e >= i32::MAX as i64 => d.clone(),
            // [0:n] of a dim is n when n fits, which a valid model guarantees.
            (Dim::Sym(_) | Dim::Fixed(_), SymInt::Int(0), SymInt::Sym(y)) if step == 1 => {
                match &s[a] {
                    Dim::Sym(x) if x != y => Dim::Unknown,
                    _ => Dim::Sym(y.clone()),
                }
            }
            _ => Dim::Unknown,
        };
    }
    Some(out)
}

fn gather(cx: &Cx) -> Option<Vec<Dim>> {
    let (data, idx) = (cx.shape(0)?, cx.shape(1)?);
    let axis = norm_axis(cx.attr_i("axis", 0), data.len())?;
    Some(
        data[..axis]
            .iter()
            .chain(idx)
            .chain(&data[axis + 1..])
            .cloned()
            .collect(),
    )
}

fn gather_nd(cx: &Cx) -> Option<Vec<Dim>> {
    let (data, idx) = (cx.shape(0)?, cx.shape(1)?);
    let b = cx.attr_i("batch_dims", 0).max(0) as usize;
    let Dim::Fixed(q) = idx.last()? else {
        return None;
    };
    let tail = data.get(b + q..)?;
    Some(idx[..idx.len() - 1].iter().chain(tail).cloned().collect())
}

/// The dims `Shape` returns (opset 15 start/end clamped like Slice).
pub(crate) fn shape_range(cx: &Cx, rank: usize) -> (usize, usize) {
    let r = rank as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    if cx.opset >= 15 {
        (clamp(cx.attr_i("start", 0)), clamp(cx.attr_i("end", r)))
    } else {
        (0, rank)
    }
}

fn shape_op(cx: &Cx) -> Option<Vec<Dim>> {
    let r = cx.rank(0)?;
    let (s, e) = shape_range(cx, r);
    Some(vec![Dim::Fixed(e.saturating_sub(s))])
}

fn expand(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let target = shape_from_input(cx, 1)?;
    Some(broadcast(&[s, &target]))
}

fn tile(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let Some(reps) = cx.const_ints(1) else {
        return Some(vec![Dim::Unknown; s.len()]);
    };
    s.iter()
        .zip(reps.iter().chain(std::iter::repeat(&1)))
        .map(|(d, &r)| {
            Some(if r == 1 {
                d.clone()
            } else {
                map_fixed(d, |n| n * r)
            })
        })
        .collect()
}

fn pad(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let pads = if cx.opset >= 11 {
        cx.const_ints(1)
    } else {
        cx.attr_ints("pads")
            .or(cx.attr_ints("paddings"))
            .map(|v| v.to_vec())
    };
    let Some(pads) = pads else {
        return Some(vec![Dim::Unknown; s.len()]);
    };
    let axes: Vec<usize> = if cx.opset >= 18 && cx.has(3) {
        match cx.const_ints(3) {
            Some(a) => a
                .iter()
                .map(|&x| norm_axis(x, s.len()))
                .collect::<Option<_>>()?,
            None => return Some(vec![Dim::Unknown; s.len()]),
        }
    } else {
        (0..s.len()).collect()
    };
    let n = axes.len();
    if pads.len() != 2 * n {
        return None;
    }
    let mut out = s.to_vec();
    for (k, &a) in axes.iter().enumerate() {
        let add = pads[k] + pads[k + n];
        if add != 0 {
            out[a] = map_fixed(&s[a], |d| d + add);
        }
    }
    Some(out)
}

fn constant(cx: &Cx) -> Option<Vec<Dim>> {
    for a in &cx.node.attrs {
        return Some(match (a.name.as_str(), &a.value) {
            ("value", AttrValue::Tensor(t)) => t.shape().iter().map(|&d| Dim::Fixed(d)).collect(),
            ("value_float" | "value_int" | "value_string", _) => vec![],
            ("value_floats", AttrValue::Floats(v)) => vec![Dim::Fixed(v.len())],
            ("value_ints", AttrValue::Ints(v)) => vec![Dim::Fixed(v.len())],
            ("value_strings", AttrValue::Strings(v)) => vec![Dim::Fixed(v.len())],
            _ => continue,
        });
    }
    None
}

fn range(cx: &Cx) -> Option<Vec<Dim>> {
    let get = |i| cx.const_floats(i).and_then(|v| v.first().copied());
    match (get(0), get(1), get(2)) {
        (Some(s), Some(l), Some(d)) if d != 0.0 => {
            Some(vec![Dim::Fixed(((l - s) / d).ceil().max(0.0) as usize)])
        }
        _ => Some(vec![Dim::Unknown]),
    }
}

fn one_hot(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let depth = cx
        .const_floats(1)
        .and_then(|v| v.first().copied())
        .map_or(Dim::Unknown, |d| Dim::Fixed(d.max(0.0) as usize));
    let axis = norm_axis(cx.attr_i("axis", -1), s.len() + 1)?;
    let mut out = s.to_vec();
    out.insert(axis, depth);
    Some(out)
}

fn top_k(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let axis = norm_axis(cx.attr_i("axis", -1), s.len())?;
    let k = if cx.opset >= 10 {
        cx.const_ints(1).and_then(|v| v.first().copied())
    } else {
        cx.attr_i_opt("k")
    };
    let mut out = s.to_vec();
    out[axis] = k.map_or(Dim::Unknown, |k| Dim::Fixed(k.max(0) as usize));
    Some(out)
}

fn compress(cx: &Cx) -> Option<Vec<Dim>> {
    let count = cx
        .const_ints(1)
        .map(|v| v.iter().filter(|&&x| x != 0).count());
    let count = count.map_or(Dim::Unknown, Dim::Fixed);
    match cx.attr_i_opt("axis") {
        Some(a) => {
            let s = cx.shape(0)?;
            let a = norm_axis(a, s.len())?;
            let mut out = s.to_vec();
            out[a] = count;
            Some(out)
        }
        None => Some(vec![count]),
    }
}

fn unique(cx: &Cx) -> Shapes {
    let s = cx.shape(0);
    let axis = cx.attr_i_opt("axis");
    let y = match (axis, s) {
        (Some(a), Some(s)) => norm_axis(a, s.len()).map(|a| {
            let mut o = s.to_vec();
            o[a] = Dim::Unknown;
            o
        }),
        (None, _) => Some(vec![Dim::Unknown]),
        _ => None,
    };
    let inverse = match (axis, s) {
        (Some(a), Some(s)) => norm_axis(a, s.len()).map(|a| vec![s[a].clone()]),
        (None, Some(s)) => Some(vec![prod_dim(s)]),
        _ => Some(vec![Dim::Unknown]),
    };
    vec![
        y,
        Some(vec![Dim::Unknown]),
        inverse,
        Some(vec![Dim::Unknown]),
    ]
}

fn depth_space(cx: &Cx, to_space: bool) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    if s.len() != 4 {
        return None;
    }
    let b = cx.attr_i("blocksize", 1).max(1);
    if b == 1 {
        return Some(s.to_vec());
    }
    let bb = b * b;
    Some(if to_space {
        let c = map_fixed(&s[1], |c| if c % bb == 0 { c / bb } else { -1 });
        vec![
            s[0].clone(),
            c,
            map_fixed(&s[2], |x| x * b),
            map_fixed(&s[3], |x| x * b),
        ]
    } else {
        let c = map_fixed(&s[1], |c| c * bb);
        vec![
            s[0].clone(),
            c,
            map_fixed(&s[2], |x| x / b),
            map_fixed(&s[3], |x| x / b),
        ]
    })
}

fn center_crop_pad(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let sizes = cx.const_ints(1);
    let axes: Vec<usize> = match cx.attr_ints("axes") {
        Some(a) => a
            .iter()
            .map(|&x| norm_axis(x, s.len()))
            .collect::<Option<_>>()?,
        None => (0..s.len()).collect(),
    };
    let mut out = s.to_vec();
    for (k, &a) in axes.iter().enumerate() {
        out[a] = sizes
            .as_ref()
            .and_then(|v| v.get(k))
            .map_or(Dim::Unknown, |&n| Dim::Fixed(n.max(0) as usize));
    }
    Some(out)
}

/// One einsum operand: its labels, with `None` standing for the ellipsis.
fn einsum_term(t: &str) -> Option<Vec<Option<char>>> {
    let t = t.replace("...", ".");
    t.chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| match c {
            '.' => Some(None),
            c if c.is_ascii_alphabetic() => Some(Some(c)),
            _ => None,
        })
        .collect()
}

fn einsum(cx: &Cx) -> Option<Vec<Dim>> {
    let eq = cx.attr_s("equation", "");
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq, None),
    };
    let terms: Vec<Vec<Option<char>>> = lhs.split(',').map(einsum_term).collect::<Option<_>>()?;
    if terms.len() != cx.n_in() {
        return None;
    }
    let mut label_dims: Vec<(char, Dim)> = Vec::new();
    let mut ellipsis: Vec<Dim> = Vec::new();
    for (i, term) in terms.iter().enumerate() {
        let s = cx.shape(i)?;
        let named = term.iter().filter(|l| l.is_some()).count();
        let ell_len = s.len().checked_sub(named)?;
        if ell_len > 0 && !term.contains(&None) {
            return None;
        }
        let mut pos = 0;
        for l in term {
            match l {
                Some(c) => {
                    let d = &s[pos];
                    match label_dims.iter_mut().find(|(k, _)| k == c) {
                        Some((_, old)) => {
                            *old = if *d == Dim::Fixed(1) {
                                old.clone()
                            } else {
                                same_dim(old, d)
                            }
                        }
                        None => label_dims.push((*c, d.clone())),
                    }
                    pos += 1;
                }
                None => {
                    let e = &s[pos..pos + ell_len];
                    ellipsis = broadcast(&[&ellipsis, e]);
                    pos += ell_len;
                }
            }
        }
    }
    let out_term: Vec<Option<char>> = match rhs {
        Some(r) => einsum_term(r)?,
        None => {
            let mut once: Vec<char> = label_dims
                .iter()
                .map(|(c, _)| *c)
                .filter(|c| terms.iter().flatten().filter(|l| **l == Some(*c)).count() == 1)
                .collect();
            once.sort_unstable();
            let mut t = if ellipsis.is_empty() {
                vec![]
            } else {
                vec![None]
            };
            t.extend(once.into_iter().map(Some));
            t
        }
    };
    let mut out = Vec::new();
    for l in out_term {
        match l {
            Some(c) => out.push(label_dims.iter().find(|(k, _)| *k == c)?.1.clone()),
            None => out.extend(ellipsis.iter().cloned()),
        }
    }
    Some(out)
}
