//! Indexing kernels: Slice, Gather*, Scatter*, OneHot, NonZero, Compress, Pad, TopK, Unique,
//! TensorScatter. Ops that only move elements are generic over `Item` (every dtype, strings
//! included); ops that compare or combine values dispatch over the numeric types.

// Generic bodies are instantiated with Copy types through the dtype macros; clones are for strings.
#![allow(clippy::clone_on_copy)]

use std::cmp::Ordering;

use kiln_runtime::tensor::numel;
use kiln_runtime::{DType, Error, Result, Tensor};

use super::shape::{
    for_chunks, gather_maps, istrides, norm_axes, scalar_from_f64, view_copy, with_item, Item, Scalar, PAR_MIN,
};
use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{norm_axis, strides};

pub fn register(r: &mut Registry) {
    r.add("Slice", slice);
    r.add("Gather", gather);
    r.add("GatherElements", gather_elements);
    r.add("GatherND", gather_nd);
    r.add("ScatterElements", scatter_elements);
    r.add("Scatter", scatter_elements);
    r.add("ScatterND", scatter_nd);
    r.add("OneHot", one_hot);
    r.add("NonZero", non_zero);
    r.add("Compress", compress);
    r.add("Pad", pad);
    r.add("TopK", top_k);
    r.add("Unique", unique);
    r.add("TensorScatter", tensor_scatter);
}

/// Resolve index `i` (negative counts from the end) against `dim`.
fn index_in(i: i64, dim: usize) -> Result<usize> {
    let j = if i < 0 { i + dim as i64 } else { i };
    if j < 0 || j >= dim as i64 {
        return Err(Error::Shape(format!("index {i} is out of range for a dim of size {dim}")));
    }
    Ok(j as usize)
}

/// Total order for sorting values: NaN after everything, NaNs equal to each other.
fn cmp_nan_last<T: PartialOrd>(a: &T, b: &T) -> Ordering {
    #[allow(clippy::eq_op)]
    a.partial_cmp(b).unwrap_or_else(|| (a != a).cmp(&(b != b)))
}

// ---------------------------------------------------------------------------------------------
// Slice
// ---------------------------------------------------------------------------------------------

fn slice(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (starts, ends, axes, steps) = if ctx.opset() < 10 {
        let need = |n: &str| ctx.attr_ints(n).ok_or_else(|| Error::Other(format!("Slice needs {n}")));
        (need("starts")?, need("ends")?, ctx.attr_ints("axes"), None)
    } else {
        let opt = |i: usize| ctx.opt_input(inputs, i).map(|t| t.to_i64_vec()).transpose();
        (ctx.input(inputs, 1)?.to_i64_vec()?, ctx.input(inputs, 2)?.to_i64_vec()?, opt(3)?, opt(4)?)
    };
    let n = starts.len();
    let axes = match axes {
        Some(a) => norm_axes(&a, x.rank())?,
        None => (0..n).collect(),
    };
    let steps = steps.unwrap_or_else(|| vec![1; n]);
    if ends.len() != n || axes.len() != n || steps.len() != n {
        return Err(Error::Shape("Slice starts/ends/axes/steps differ in length".into()));
    }
    let st = istrides(x.shape());
    let mut shape = x.shape().to_vec();
    let mut vst = st.clone();
    let mut base = 0isize;
    for k in 0..n {
        let (a, step) = (axes[k], steps[k]);
        if step == 0 {
            return Err(Error::Other("Slice step is zero".into()));
        }
        let dim = shape[a] as i64;
        let wrap = |v: i64| if v < 0 { v + dim } else { v };
        let (s, e) = if step > 0 {
            (wrap(starts[k]).clamp(0, dim), wrap(ends[k]).clamp(0, dim))
        } else {
            (wrap(starts[k]).clamp(0, (dim - 1).max(0)), wrap(ends[k]).clamp(-1, dim - 1))
        };
        let span = if step > 0 { e - s } else { s - e };
        let len = if dim == 0 || span <= 0 { 0 } else { (span - 1) / step.abs() + 1 };
        shape[a] = len as usize;
        base += s as isize * st[a];
        vst[a] = st[a] * step as isize;
    }
    if shape == x.shape() && vst == st {
        return Ok(vec![x.clone()]);
    }
    if numel(&shape) == 0 {
        base = 0;
    }
    Ok(vec![view_copy(x, base as usize, &shape, &vst)?])
}

// ---------------------------------------------------------------------------------------------
// Gathers
// ---------------------------------------------------------------------------------------------

fn gather(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let ind = ctx.input(inputs, 1)?;
    let axis = norm_axis(ctx.attr_i("axis", 0), x.rank())?;
    let dim = x.shape()[axis];
    let idx: Vec<usize> = ind.to_i64_vec()?.into_iter().map(|i| index_in(i, dim)).collect::<Result<_>>()?;
    let mut shape = x.shape()[..axis].to_vec();
    shape.extend(ind.shape());
    shape.extend(&x.shape()[axis + 1..]);
    let inner: usize = x.shape()[axis + 1..].iter().product();
    let ni = idx.len();
    let dt = x.dtype();
    let out = with_item!(dt, T, {
        let src = T::items(x)?;
        T::build(dt, &shape, |dst| {
            if inner == 0 || ni == 0 {
                return Ok(());
            }
            let par = dst.len() >= PAR_MIN;
            let rows = dst.len() / inner;
            let per = if par { rows.div_ceil(crate::cpu::par::threads() * 4) } else { rows };
            for_chunks(dst, per * inner, par, |ci, chunk| {
                for (k, row) in chunk.chunks_mut(inner).enumerate() {
                    let r = ci * per + k;
                    let s = ((r / ni) * dim + idx[r % ni]) * inner;
                    row.clone_from_slice(&src[s..s + inner]);
                }
            });
            Ok(())
        })?
    });
    Ok(vec![out])
}

/// Data offsets addressed by GatherElements / ScatterElements: for each position of `ishape`
/// (row-major), the data position with the `axis` coordinate replaced by the index there.
fn element_offsets(dshape: &[usize], ishape: &[usize], idx: &[i64], axis: usize) -> Result<Vec<usize>> {
    if dshape.len() != ishape.len() {
        return Err(Error::Shape(format!("indices rank {} differs from data rank {}", ishape.len(), dshape.len())));
    }
    if (0..dshape.len()).any(|k| k != axis && ishape[k] > dshape[k]) {
        return Err(Error::Shape(format!("indices shape {ishape:?} exceeds data shape {dshape:?}")));
    }
    let ds = strides(dshape);
    let mut pos = vec![0usize; ishape.len()];
    let mut out = Vec::with_capacity(idx.len());
    for &i in idx {
        let mut off = index_in(i, dshape[axis])? * ds[axis];
        for k in 0..pos.len() {
            if k != axis {
                off += pos[k] * ds[k];
            }
        }
        out.push(off);
        for k in (0..pos.len()).rev() {
            pos[k] += 1;
            if pos[k] < ishape[k] {
                break;
            }
            pos[k] = 0;
        }
    }
    Ok(out)
}

fn gather_elements(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let ind = ctx.input(inputs, 1)?;
    let axis = norm_axis(ctx.attr_i("axis", 0), x.rank())?;
    let offs = element_offsets(x.shape(), ind.shape(), &ind.to_i64_vec()?, axis)?;
    let dt = x.dtype();
    let out = with_item!(dt, T, {
        let src = T::items(x)?;
        T::build(dt, ind.shape(), |dst| {
            for (d, &o) in dst.iter_mut().zip(&offs) {
                *d = src[o].clone();
            }
            Ok(())
        })?
    });
    Ok(vec![out])
}

/// Slice starts addressed by GatherND / ScatterND index tuples, with the slice length.
/// Returns (offsets into data, slice length, shape of the tuple grid).
fn nd_offsets(dshape: &[usize], ind: &Tensor, batch_dims: usize) -> Result<(Vec<usize>, usize, Vec<usize>)> {
    let ishape = ind.shape();
    let m = *ishape.last().ok_or_else(|| Error::Shape("ND indices must have rank >= 1".into()))?;
    if batch_dims >= ishape.len() || batch_dims + m > dshape.len() || ishape[..batch_dims] != dshape[..batch_dims] {
        return Err(Error::Shape(format!(
            "indices {ishape:?} (batch_dims {batch_dims}) do not fit data {dshape:?}"
        )));
    }
    let idx = ind.to_i64_vec()?;
    let slice: usize = dshape[batch_dims + m..].iter().product();
    let ds = strides(&dshape[batch_dims..]);
    let batch_size: usize = dshape[batch_dims..].iter().product();
    let per_batch: usize = ishape[batch_dims..ishape.len() - 1].iter().product();
    let grid = ishape[..ishape.len() - 1].to_vec();
    let tuples = numel(&grid);
    let mut offs = Vec::with_capacity(tuples);
    for q in 0..tuples {
        let mut off = q.checked_div(per_batch).unwrap_or(0) * batch_size;
        for j in 0..m {
            off += index_in(idx[q * m + j], dshape[batch_dims + j])? * ds[j];
        }
        offs.push(off);
    }
    Ok((offs, slice, grid))
}

fn gather_nd(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let ind = ctx.input(inputs, 1)?;
    let b = ctx.attr_i("batch_dims", 0);
    let b = usize::try_from(b).map_err(|_| Error::Shape(format!("batch_dims {b} is negative")))?;
    let (offs, len, mut shape) = nd_offsets(x.shape(), ind, b)?;
    let m = ind.shape()[ind.rank() - 1];
    shape.extend(&x.shape()[b + m..]);
    let dt = x.dtype();
    let out = with_item!(dt, T, {
        let src = T::items(x)?;
        T::build(dt, &shape, |dst| {
            if len > 0 {
                for (d, &o) in dst.chunks_mut(len).zip(&offs) {
                    d.clone_from_slice(&src[o..o + len]);
                }
            }
            Ok(())
        })?
    });
    Ok(vec![out])
}

// ---------------------------------------------------------------------------------------------
// Scatters
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Reduce {
    None,
    Add,
    Mul,
    Max,
    Min,
}

fn reduction(ctx: &OpCtx) -> Result<Reduce> {
    Ok(match ctx.attr_s("reduction", "none").as_str() {
        "none" => Reduce::None,
        "add" => Reduce::Add,
        "mul" => Reduce::Mul,
        "max" => Reduce::Max,
        "min" => Reduce::Min,
        r => return Err(ctx.unsupported(format!("reduction {r}"))),
    })
}

/// Copy of `data` with `updates[u..u+len]` combined into `data[d..d+len]` for each (d, u) pair,
/// in order (later pairs win for `Reduce::None`).
fn scatter_apply(data: &Tensor, updates: &Tensor, pairs: &[(usize, usize)], len: usize, red: Reduce) -> Result<Tensor> {
    let dt = data.dtype();
    if updates.dtype() != dt {
        return Err(Error::DType(format!("updates are {}, data is {dt}", updates.dtype())));
    }
    if red == Reduce::None {
        return with_item!(dt, T, {
            let (src, upd) = (T::items(data)?, T::items(updates)?);
            T::build(dt, data.shape(), |dst| {
                dst.clone_from_slice(src);
                for &(d, u) in pairs {
                    dst[d..d + len].clone_from_slice(&upd[u..u + len]);
                }
                Ok(())
            })
        });
    }
    if dt == DType::Bool {
        return Err(Error::DType("scatter reductions need a numeric dtype".into()));
    }
    crate::with_numeric!(dt, T, {
        let upd = updates.view::<T>()?;
        let mut out = data.clone();
        let dst = out.view_mut::<T>()?;
        let f = |a: T, b: T| -> T {
            match red {
                Reduce::Add => a.add(b),
                Reduce::Mul => a.mul(b),
                Reduce::Max => if cmp_nan_last(&b, &a) == Ordering::Greater { b } else { a },
                _ => if cmp_nan_last(&b, &a) == Ordering::Less { b } else { a },
            }
        };
        for &(d, u) in pairs {
            for k in 0..len {
                dst[d + k] = f(dst[d + k], upd[u + k]);
            }
        }
        Ok(out)
    })
}

fn scatter_elements(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let ind = ctx.input(inputs, 1)?;
    let upd = ctx.input(inputs, 2)?;
    if upd.shape() != ind.shape() {
        return Err(Error::Shape(format!("updates {:?} differ from indices {:?}", upd.shape(), ind.shape())));
    }
    let axis = norm_axis(ctx.attr_i("axis", 0), x.rank())?;
    let offs = element_offsets(x.shape(), ind.shape(), &ind.to_i64_vec()?, axis)?;
    let pairs: Vec<(usize, usize)> = offs.into_iter().enumerate().map(|(u, d)| (d, u)).collect();
    Ok(vec![scatter_apply(x, upd, &pairs, 1, reduction(ctx)?)?])
}

fn scatter_nd(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let ind = ctx.input(inputs, 1)?;
    let upd = ctx.input(inputs, 2)?;
    let (offs, len, mut want) = nd_offsets(x.shape(), ind, 0)?;
    want.extend(&x.shape()[ind.shape()[ind.rank() - 1]..]);
    if upd.shape() != want.as_slice() {
        return Err(Error::Shape(format!("updates {:?} should be {want:?}", upd.shape())));
    }
    let pairs: Vec<(usize, usize)> = offs.into_iter().enumerate().map(|(q, d)| (d, q * len)).collect();
    Ok(vec![scatter_apply(x, upd, &pairs, len, reduction(ctx)?)?])
}

fn tensor_scatter(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let past = ctx.input(inputs, 0)?;
    let upd = ctx.input(inputs, 1)?;
    let r = past.rank();
    let axis = norm_axis(ctx.attr_i("axis", -2), r)?;
    let circular = match ctx.attr_s("mode", "linear").as_str() {
        "linear" => false,
        "circular" => true,
        m => return Err(ctx.unsupported(format!("mode {m}"))),
    };
    let (ps, us) = (past.shape(), upd.shape());
    if axis == 0 || us.len() != r || (0..r).any(|k| if k == axis { us[k] > ps[k] } else { us[k] != ps[k] }) {
        return Err(Error::Shape(format!("TensorScatter update {us:?} does not fit cache {ps:?} on axis {axis}")));
    }
    let write = match ctx.opt_input(inputs, 2) {
        Some(t) => t.to_i64_vec()?,
        None => vec![0; ps[0]],
    };
    if write.len() != ps[0] {
        return Err(Error::Shape(format!("{} write indices for batch {}", write.len(), ps[0])));
    }
    let (max_len, seq) = (ps[axis], us[axis]);
    let inner: usize = ps[axis + 1..].iter().product();
    let prefix: usize = ps[..axis].iter().product();
    let per_batch = prefix / ps[0].max(1);
    let mut pairs = Vec::with_capacity(prefix * seq);
    for p in 0..prefix {
        let w = write[p / per_batch.max(1)];
        for s in 0..seq {
            let mut pos = w + s as i64;
            if circular {
                pos = pos.rem_euclid(max_len.max(1) as i64);
            }
            if pos < 0 || pos >= max_len as i64 {
                return Err(Error::Shape(format!("write position {pos} is outside the cache length {max_len}")));
            }
            pairs.push(((p * max_len + pos as usize) * inner, (p * seq + s) * inner));
        }
    }
    Ok(vec![scatter_apply(past, upd, &pairs, inner, Reduce::None)?])
}

// ---------------------------------------------------------------------------------------------
// OneHot, NonZero, Compress
// ---------------------------------------------------------------------------------------------

fn one_hot(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let ind = ctx.input(inputs, 0)?;
    let depth = ctx.input(inputs, 1)?.to_f64_vec()?;
    let values = ctx.input(inputs, 2)?;
    let depth = *depth.first().ok_or_else(|| Error::Shape("OneHot depth is empty".into()))? as i64;
    if depth < 0 || values.len() != 2 {
        return Err(Error::Shape(format!("OneHot needs depth >= 0 and two values (depth {depth})")));
    }
    let depth = depth as usize;
    let axis = norm_axis(ctx.attr_i("axis", -1), ind.rank() + 1)?;
    let idx = ind.to_f64_vec()?;
    let outer: usize = ind.shape()[..axis].iter().product();
    let inner: usize = ind.shape()[axis..].iter().product();
    let mut shape = ind.shape()[..axis].to_vec();
    shape.push(depth);
    shape.extend(&ind.shape()[axis..]);
    let dt = values.dtype();
    let out = with_item!(dt, T, {
        let v = T::items(values)?;
        T::build(dt, &shape, |dst| {
            dst.fill(v[0].clone());
            for o in 0..outer {
                for i in 0..inner {
                    let mut k = idx[o * inner + i] as i64;
                    if k < 0 {
                        k += depth as i64;
                    }
                    if k >= 0 && (k as usize) < depth {
                        dst[(o * depth + k as usize) * inner + i] = v[1].clone();
                    }
                }
            }
            Ok(())
        })?
    });
    Ok(vec![out])
}

/// Per-element "is nonzero" flags for any dtype that has a zero.
fn nonzero_mask(x: &Tensor) -> Result<Vec<bool>> {
    Ok(match x.dtype() {
        DType::String => x.strings()?.iter().map(|s| !s.is_empty()).collect(),
        DType::Bool | DType::U4 | DType::I4 => x.bytes().iter().map(|&b| b != 0).collect(),
        d if d.is_float() && !matches!(d, DType::F32 | DType::F64 | DType::F16 | DType::BF16) => {
            // float8/float4 codes: zero is the code with all bits but the sign clear.
            let sign = if d == DType::F4E2M1 { 0x08 } else { 0x80 };
            let fnuz = matches!(d, DType::F8E4M3FNUZ | DType::F8E5M2FNUZ | DType::F8E8M0);
            x.bytes().iter().map(|&b| if fnuz { b != 0 } else { b & !sign != 0 }).collect()
        }
        d => crate::with_numeric!(d, T, { x.view::<T>()?.iter().map(|v| *v != T::default()).collect() }),
    })
}

fn non_zero(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let mask = nonzero_mask(x)?;
    let shape: Vec<usize> = if x.rank() == 0 { vec![1] } else { x.shape().to_vec() };
    let hits: Vec<usize> = mask.iter().enumerate().filter(|(_, &m)| m).map(|(i, _)| i).collect();
    let r = shape.len();
    let nnz = hits.len();
    let st = strides(&shape);
    let mut out = vec![0i64; r * nnz];
    for (j, &flat) in hits.iter().enumerate() {
        for k in 0..r {
            out[k * nnz + j] = ((flat / st[k]) % shape[k]) as i64;
        }
    }
    Ok(vec![Tensor::from_vec(&[r, nnz], out)?])
}

fn compress(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let cond = nonzero_mask(ctx.input(inputs, 1)?)?;
    let (flat, axis) = match ctx.attr_i_opt("axis") {
        Some(a) => (x.clone(), norm_axis(a, x.rank())?),
        None => (x.reshape(&[x.len()])?, 0),
    };
    let dim = flat.shape()[axis];
    let keep: Vec<isize> = (0..dim.min(cond.len())).filter(|&i| cond[i]).map(|i| i as isize).collect();
    let mut maps: Vec<Vec<isize>> = flat.shape().iter().map(|&d| (0..d as isize).collect()).collect();
    maps[axis] = keep;
    Ok(vec![gather_maps(&flat, &maps, None)?])
}

// ---------------------------------------------------------------------------------------------
// Pad
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

/// Source index for output position `o` of a padded axis (or -1 for the constant).
fn pad_source(o: i64, begin: i64, n: i64, mode: PadMode) -> isize {
    let i = o - begin;
    if (0..n).contains(&i) {
        return i as isize;
    }
    (match mode {
        PadMode::Constant => -1,
        PadMode::Edge => i.clamp(0, n - 1),
        PadMode::Wrap => i.rem_euclid(n),
        PadMode::Reflect if n == 1 => 0,
        PadMode::Reflect => {
            let m = i.rem_euclid(2 * (n - 1));
            if m < n { m } else { 2 * (n - 1) - m }
        }
    }) as isize
}

fn pad(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let r = x.rank();
    let mode = match ctx.attr_s("mode", "constant").as_str() {
        "constant" => PadMode::Constant,
        "reflect" => PadMode::Reflect,
        "edge" => PadMode::Edge,
        "wrap" => PadMode::Wrap,
        m => return Err(ctx.unsupported(format!("mode {m}"))),
    };
    let pads = if ctx.opset() < 11 {
        ctx.attr_ints("pads").or_else(|| ctx.attr_ints("paddings")).unwrap_or_default()
    } else {
        ctx.input(inputs, 1)?.to_i64_vec()?
    };
    let axes = match ctx.opt_input(inputs, 3) {
        Some(a) if ctx.opset() >= 18 => norm_axes(&a.to_i64_vec()?, r)?,
        _ => (0..r).collect(),
    };
    let na = axes.len();
    if pads.len() != 2 * na {
        return Err(Error::Shape(format!("{} pads for {na} axes", pads.len())));
    }
    let fill = if ctx.opset() < 11 {
        Some(scalar_from_f64(x.dtype(), ctx.attr_f("value", 0.0) as f64)?)
    } else {
        match ctx.opt_input(inputs, 2) {
            Some(v) if !v.is_empty() => Some(v.clone()),
            _ => None,
        }
    };
    if let Some(f) = &fill {
        if f.dtype() != x.dtype() {
            return Err(Error::DType(format!("pad value is {}, data is {}", f.dtype(), x.dtype())));
        }
    }
    let mut maps: Vec<Vec<isize>> = x.shape().iter().map(|&d| (0..d as isize).collect()).collect();
    for (k, &a) in axes.iter().enumerate() {
        let (b, e, n) = (pads[k], pads[k + na], x.shape()[a] as i64);
        let len = n + b + e;
        if len < 0 {
            return Err(Error::Shape(format!("pads {b},{e} remove more than axis {a} holds")));
        }
        if n == 0 && len > 0 && mode != PadMode::Constant {
            return Err(Error::Shape(format!("cannot pad the empty axis {a} in this mode")));
        }
        maps[a] = (0..len).map(|o| pad_source(o, b, n, mode)).collect();
    }
    Ok(vec![gather_maps(x, &maps, fill.as_ref())?])
}

// ---------------------------------------------------------------------------------------------
// TopK, Unique
// ---------------------------------------------------------------------------------------------

fn top_k(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let k = if ctx.opset() < 10 {
        ctx.attr_i("k", -1)
    } else {
        *ctx.input(inputs, 1)?.to_i64_vec()?.first().ok_or_else(|| Error::Shape("TopK K is empty".into()))?
    };
    let axis = norm_axis(ctx.attr_i("axis", -1), x.rank())?;
    let largest = ctx.attr_i("largest", 1) != 0;
    let dim = x.shape()[axis];
    if k < 0 || k as usize > dim {
        return Err(Error::Shape(format!("TopK k={k} is outside [0, {dim}]")));
    }
    let k = k as usize;
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis + 1..].iter().product();
    let mut shape = x.shape().to_vec();
    shape[axis] = k;
    let mut ind = vec![0i64; outer * k * inner];
    let vals = crate::with_numeric!(x.dtype(), T, {
        let src = x.view::<T>()?;
        let mut out = vec![T::default(); outer * k * inner];
        let mut row: Vec<(T, usize)> = Vec::with_capacity(dim);
        // Ties keep the smaller index first in both directions.
        let order = |a: &(T, usize), b: &(T, usize)| {
            let c = cmp_nan_last(&a.0, &b.0);
            (if largest { c.reverse() } else { c }).then(a.1.cmp(&b.1))
        };
        for o in 0..outer {
            for i in 0..inner {
                row.clear();
                row.extend((0..dim).map(|j| (src[(o * dim + j) * inner + i], j)));
                if k > 0 && k < dim {
                    row.select_nth_unstable_by(k - 1, order);
                }
                row[..k].sort_unstable_by(order);
                for (j, &(v, at)) in row[..k].iter().enumerate() {
                    out[(o * k + j) * inner + i] = v;
                    ind[(o * k + j) * inner + i] = at as i64;
                }
            }
        }
        Tensor::from_slice_as(x.dtype(), &shape, &out)?
    });
    Ok(vec![vals, Tensor::from_vec(&shape, ind)?])
}

/// Groups equal sub-arrays `x[o, j, i]` (over o, i) for j in 0..n. Returns, in output order,
/// each group's first index and count, plus each j's group number.
fn unique_groups<T: PartialOrd>(x: &[T], outer: usize, n: usize, inner: usize, sorted: bool) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let cmp = |a: usize, b: usize| -> Ordering {
        for o in 0..outer {
            for i in 0..inner {
                let c = cmp_nan_last(&x[(o * n + a) * inner + i], &x[(o * n + b) * inner + i]);
                if c != Ordering::Equal {
                    return c;
                }
            }
        }
        Ordering::Equal
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| cmp(a, b));
    let mut first = Vec::new();
    let mut counts = Vec::new();
    let mut group = vec![0usize; n];
    for (p, &j) in order.iter().enumerate() {
        if p == 0 || cmp(order[p - 1], j) != Ordering::Equal {
            first.push(j);
            counts.push(0);
        }
        group[j] = first.len() - 1;
        *counts.last_mut().unwrap() += 1;
    }
    if !sorted {
        let mut by_first: Vec<usize> = (0..first.len()).collect();
        by_first.sort_by_key(|&g| first[g]);
        let mut rank = vec![0; first.len()];
        for (r, &g) in by_first.iter().enumerate() {
            rank[g] = r;
        }
        first = by_first.iter().map(|&g| first[g]).collect();
        counts = by_first.iter().map(|&g| counts[g]).collect();
        for g in group.iter_mut() {
            *g = rank[*g];
        }
    }
    (first, counts, group)
}

fn unique(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let sorted = ctx.attr_i("sorted", 1) != 0;
    let (flat, axis) = match ctx.attr_i_opt("axis") {
        Some(a) => (x.clone(), norm_axis(a, x.rank())?),
        None => (x.reshape(&[x.len()])?, 0),
    };
    let n = flat.shape()[axis];
    let outer: usize = flat.shape()[..axis].iter().product();
    let inner: usize = flat.shape()[axis + 1..].iter().product();
    let (first, counts, group) = match x.dtype() {
        DType::String => unique_groups(x.strings()?, outer, n, inner, sorted),
        DType::Bool => unique_groups(x.view::<bool>()?, outer, n, inner, sorted),
        d => crate::with_numeric!(d, T, { unique_groups(x.view::<T>()?, outer, n, inner, sorted) }),
    };
    let mut maps: Vec<Vec<isize>> = flat.shape().iter().map(|&d| (0..d as isize).collect()).collect();
    maps[axis] = first.iter().map(|&j| j as isize).collect();
    let y = gather_maps(&flat, &maps, None)?;
    let ints = |v: &[usize]| Tensor::from_vec(&[v.len()], v.iter().map(|&i| i as i64).collect::<Vec<_>>());
    Ok(vec![y, ints(&first)?, ints(&group)?, ints(&counts)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    fn step(op: &str, opset: i64, attrs: Vec<Attr>) -> Step {
        Step { op: op.into(), opset, outputs: vec![0, 1, 2, 3], attrs, ..Default::default() }
    }
    fn ai(name: &str, v: i64) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Int as i32, i: v, ..Default::default() }
    }
    fn astr(name: &str, v: &str) -> Attr {
        Attr { name: name.into(), kind: AttrKind::String as i32, s: v.as_bytes().to_vec(), ..Default::default() }
    }
    fn run(k: crate::cpu::registry::TensorKernel, s: &Step, ins: Vec<Option<Tensor>>) -> Vec<Tensor> {
        k(&OpCtx::new(s, None), &ins).unwrap()
    }
    fn f32s(shape: &[usize]) -> Tensor {
        Tensor::from_vec(shape, (0..numel(shape)).map(|i| i as f32).collect()).unwrap()
    }
    fn i64s(v: &[i64]) -> Option<Tensor> {
        Some(Tensor::from_vec(&[v.len()], v.to_vec()).unwrap())
    }
    fn f(t: &Tensor) -> Vec<f32> {
        t.view::<f32>().unwrap().to_vec()
    }

    #[test]
    fn slice_steps_and_clamping() {
        let s = step("Slice", 13, vec![]);
        let y = run(slice, &s, vec![Some(f32s(&[2, 4])), i64s(&[1, -1]), i64s(&[2, i64::MIN]), i64s(&[0, 1]), i64s(&[1, -2])]);
        assert_eq!(f(&y[0]), vec![7., 5.]);
        let y = run(slice, &s, vec![Some(f32s(&[5])), i64s(&[-100]), i64s(&[i64::MAX]), None, None]);
        assert_eq!(f(&y[0]), vec![0., 1., 2., 3., 4.]);
        let y = run(slice, &s, vec![Some(f32s(&[5])), i64s(&[3]), i64s(&[1]), None, None]);
        assert_eq!(y[0].shape(), &[0]);
    }

    #[test]
    fn gathers() {
        let s = step("Gather", 13, vec![ai("axis", 1)]);
        let y = run(gather, &s, vec![Some(f32s(&[2, 3])), Some(Tensor::from_vec(&[2], vec![-1i64, 0]).unwrap())]);
        assert_eq!(f(&y[0]), vec![2., 0., 5., 3.]);
        let s = step("GatherElements", 13, vec![ai("axis", 1)]);
        let y = run(gather_elements, &s, vec![Some(f32s(&[2, 2])), Some(Tensor::from_vec(&[2, 2], vec![0i64, 0, 1, 0]).unwrap())]);
        assert_eq!(f(&y[0]), vec![0., 0., 3., 2.]);
        let s = step("GatherND", 13, vec![ai("batch_dims", 1)]);
        let y = run(gather_nd, &s, vec![Some(f32s(&[2, 2, 2])), Some(Tensor::from_vec(&[2, 1], vec![1i64, 0]).unwrap())]);
        assert_eq!(f(&y[0]), vec![2., 3., 4., 5.]);
    }

    #[test]
    fn scatters() {
        let s = step("ScatterElements", 18, vec![ai("axis", 1), astr("reduction", "add")]);
        let y = run(scatter_elements, &s, vec![Some(f32s(&[1, 3])), Some(Tensor::from_vec(&[1, 2], vec![1i64, 1]).unwrap()), Some(Tensor::from_vec(&[1, 2], vec![10f32, 20.]).unwrap())]);
        assert_eq!(f(&y[0]), vec![0., 31., 2.]);
        let s = step("ScatterND", 13, vec![]);
        let y = run(scatter_nd, &s, vec![Some(f32s(&[4])), Some(Tensor::from_vec(&[1, 1], vec![-1i64]).unwrap()), Some(Tensor::from_vec(&[1], vec![9f32]).unwrap())]);
        assert_eq!(f(&y[0]), vec![0., 1., 2., 9.]);
    }

    #[test]
    fn pad_modes() {
        let x = || Some(f32s(&[3]));
        let p = |m: &str| step("Pad", 13, vec![astr("mode", m)]);
        assert_eq!(f(&run(pad, &p("reflect"), vec![x(), i64s(&[3, 2])])[0]), vec![1., 2., 1., 0., 1., 2., 1., 0.]);
        assert_eq!(f(&run(pad, &p("edge"), vec![x(), i64s(&[2, 1])])[0]), vec![0., 0., 0., 1., 2., 2.]);
        assert_eq!(f(&run(pad, &p("wrap"), vec![x(), i64s(&[2, 1])])[0]), vec![1., 2., 0., 1., 2., 0.]);
        let c = Some(Tensor::scalar(7f32));
        assert_eq!(f(&run(pad, &p("constant"), vec![x(), i64s(&[1, -1]), c])[0]), vec![7., 0., 1.]);
    }

    #[test]
    fn topk_unique_onehot() {
        let x = Tensor::from_vec(&[5], vec![3f32, 1., 3., 2., 1.]).unwrap();
        let y = run(top_k, &step("TopK", 11, vec![]), vec![Some(x.clone()), i64s(&[3])]);
        assert_eq!(f(&y[0]), vec![3., 3., 2.]);
        assert_eq!(y[1].view::<i64>().unwrap(), &[0, 2, 3]);
        let y = run(top_k, &step("TopK", 11, vec![ai("largest", 0)]), vec![Some(x.clone()), i64s(&[2])]);
        assert_eq!(y[1].view::<i64>().unwrap(), &[1, 4]);
        let y = run(unique, &step("Unique", 11, vec![ai("sorted", 0)]), vec![Some(x)]);
        assert_eq!(f(&y[0]), vec![3., 1., 2.]);
        assert_eq!(y[1].view::<i64>().unwrap(), &[0, 1, 3]);
        assert_eq!(y[2].view::<i64>().unwrap(), &[0, 1, 0, 2, 1]);
        assert_eq!(y[3].view::<i64>().unwrap(), &[2, 2, 1]);
        let y = run(one_hot, &step("OneHot", 11, vec![ai("axis", 0)]), vec![i64s(&[0, -1]), Some(Tensor::scalar(3i64)), Some(Tensor::from_vec(&[2], vec![0f32, 1.]).unwrap())]);
        assert_eq!(y[0].shape(), &[3, 2]);
        assert_eq!(f(&y[0]), vec![1., 0., 0., 0., 0., 1.]);
        let y = run(non_zero, &step("NonZero", 13, vec![]), vec![Some(f32s(&[2, 2]))]);
        assert_eq!(y[0].view::<i64>().unwrap(), &[0, 1, 1, 1, 0, 1]);
    }
}
