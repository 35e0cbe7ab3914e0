//! Layout kernels: ops that move elements without computing on them (Reshape, Transpose, Concat,
//! Split, Tile, Expand, DepthToSpace, Trilu…) and small shape producers (Shape, Size, Range,
//! ConstantOfShape, EyeLike). Element movers are generic over [`Item`], so one implementation
//! serves every dtype: plain-data kinds by element size, strings by cloning.
//!
//! Also home of the movers shared with index.rs and resize.rs: `strided_copy` (any affine view:
//! transposes, slices, broadcasts, tiles) and `gather_axes` (per-axis index maps: pads, crops,
//! nearest resize).

// Generic bodies are instantiated with Copy types through the dtype macros; clones are for strings.
#![allow(clippy::clone_on_copy)]

use std::mem::{align_of, size_of};

use kiln_runtime::tensor::{numel, Buffer};
use kiln_runtime::{DType, Elem, Error, Result, Tensor};

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{broadcast_shapes, broadcast_strides, norm_axis, strides};

pub fn register(r: &mut Registry) {
    r.add("Reshape", reshape);
    r.add("Flatten", flatten);
    r.add("Squeeze", squeeze);
    r.add("Unsqueeze", unsqueeze);
    r.add("Shape", shape_op);
    r.add("Size", size_op);
    r.add("Expand", expand);
    r.add("ConstantOfShape", constant_of_shape);
    r.add("Range", range);
    r.add("EyeLike", eye_like);
    r.add("Transpose", transpose);
    r.add("Tile", tile);
    r.add("Concat", concat);
    r.add("Split", split);
    r.add("Trilu", trilu);
    r.add("DepthToSpace", depth_to_space);
    r.add("SpaceToDepth", space_to_depth);
    r.add("ReverseSequence", reverse_sequence);
    r.add("CenterCropPad", center_crop_pad);
    r.add("Col2Im", col2im);
}

// ---------------------------------------------------------------------------------------------
// Generic element access
// ---------------------------------------------------------------------------------------------

/// An element a data-moving kernel can copy: the unsigned integer of the dtype's size for every
/// plain-data dtype (bit patterns are moved untouched), or `String`.
pub(crate) trait Item: Clone + Default + Send + Sync + 'static {
    /// The tensor's elements; errors if the dtype's element is not this type.
    fn items(t: &Tensor) -> Result<&[Self]>;
    /// A new tensor of `dtype`/`shape` whose elements `fill` writes (they start zeroed / empty).
    fn build(
        dtype: DType,
        shape: &[usize],
        fill: impl FnOnce(&mut [Self]) -> Result<()>,
    ) -> Result<Tensor>;
    /// Like `build` for a `fill` that writes every element: the elements start with unspecified
    /// values (reused memory), which saves zeroing the output.
    fn build_full(
        dtype: DType,
        shape: &[usize],
        fill: impl FnOnce(&mut [Self]) -> Result<()>,
    ) -> Result<Tensor> {
        Self::build(dtype, shape, fill)
    }
}

macro_rules! pod_item {
    ($($t:ty),*) => {$(
        impl Item for $t {
            fn items(t: &Tensor) -> Result<&[Self]> {
                if t.dtype() == DType::String || t.dtype().size() != size_of::<$t>() {
                    return Err(Error::DType(format!("{} elements are not {}-byte data", t.dtype(), size_of::<$t>())));
                }
                let b = t.bytes();
                if b.is_empty() {
                    return Ok(&[]);
                }
                if b.as_ptr() as usize % align_of::<$t>() != 0 {
                    return Err(Error::Other("tensor data is not aligned".into()));
                }
                // SAFETY: plain integers accept any bit pattern; pointer aligned; length exact.
                Ok(unsafe { std::slice::from_raw_parts(b.as_ptr() as *const $t, b.len() / size_of::<$t>()) })
            }

            fn build(
                dtype: DType,
                shape: &[usize],
                fill: impl FnOnce(&mut [Self]) -> Result<()>,
            ) -> Result<Tensor> {
                let n = numel(shape);
                let mut buf = Buffer::zeroed(n * size_of::<$t>());
                {
                    let bytes = buf.make_mut();
                    // SAFETY: fresh 64-byte aligned heap buffer of exactly n elements.
                    let s = unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut $t, n) };
                    fill(s)?;
                }
                Tensor::from_buffer(dtype, shape, buf)
            }

            fn build_full(
                dtype: DType,
                shape: &[usize],
                fill: impl FnOnce(&mut [Self]) -> Result<()>,
            ) -> Result<Tensor> {
                let n = numel(shape);
                let mut buf = Buffer::recycled(n * size_of::<$t>());
                {
                    let bytes = buf.make_mut();
                    // SAFETY: fresh 64-byte aligned heap buffer of exactly n elements, initialised
                    // (stale) bytes, and integers accept any bit pattern.
                    let s = unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut $t, n) };
                    fill(s)?;
                }
                Tensor::from_buffer(dtype, shape, buf)
            }
        }
    )*};
}
pod_item!(u8, u16, u32, u64, u128);

impl Item for String {
    fn items(t: &Tensor) -> Result<&[Self]> {
        t.strings()
    }

    fn build(
        _dtype: DType,
        shape: &[usize],
        fill: impl FnOnce(&mut [Self]) -> Result<()>,
    ) -> Result<Tensor> {
        let mut v = vec![String::new(); numel(shape)];
        fill(&mut v)?;
        Tensor::from_strings(shape, v)
    }
}

/// Bind `$T` to the [`Item`] type of `$dtype` (strings included) and evaluate `$body`.
macro_rules! with_item {
    ($dtype:expr, $T:ident, $body:block) => {
        if $dtype == kiln_runtime::DType::String {
            type $T = String;
            $body
        } else {
            $crate::with_pod!($dtype, $T, $body)
        }
    };
}
pub(crate) use with_item;

/// Numeric element types kernels compute on (reductions of scatters, interpolation, col2im).
/// Integer arithmetic wraps, like the hardware does.
pub(crate) trait Scalar: Elem + PartialOrd {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn to_f64(self) -> f64;
    /// Saturating conversion (NaN becomes 0 for integers).
    fn from_f64(v: f64) -> Self;
}

macro_rules! int_scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self { v as $t }
        }
    )*};
}
int_scalar!(i8, i16, i32, i64, u8, u16, u32, u64);

macro_rules! float_scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            fn add(self, o: Self) -> Self { self + o }
            fn mul(self, o: Self) -> Self { self * o }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self { v as $t }
        }
    )*};
}
float_scalar!(f32, f64);

macro_rules! half_scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            fn to_f64(self) -> f64 { self.to_f64() }
            fn from_f64(v: f64) -> Self { <$t>::from_f64(v) }
        }
    )*};
}
half_scalar!(half::f16, half::bf16);

/// A one-element tensor of a numeric or bool `dtype` holding `v` (converted, saturating).
pub(crate) fn scalar_from_f64(dtype: DType, v: f64) -> Result<Tensor> {
    if dtype == DType::Bool {
        return Ok(Tensor::scalar(v != 0.0));
    }
    crate::with_numeric!(dtype, T, { Ok(Tensor::scalar(<T as Scalar>::from_f64(v))) })
}

/// Element counts at or above which movers split work across threads.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// Run `f(chunk_index, chunk)` over `chunk`-sized pieces of `dst`, in parallel when `par`.
pub(crate) fn for_chunks<T: Send>(
    dst: &mut [T],
    chunk: usize,
    par: bool,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if par {
        crate::cpu::par::chunks_mut(dst, chunk, f);
    } else {
        dst.chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// How many rows (of `rows` total) one parallel task takes.
fn rows_per_task(rows: usize, par: bool) -> usize {
    if par {
        rows.div_ceil(crate::cpu::par::threads() * 4).max(1)
    } else {
        rows.max(1)
    }
}

/// Row-major multi-index of flat position `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        if shape[k] > 0 {
            idx[k] = i % shape[k];
            i /= shape[k];
        }
    }
    idx
}

/// Drop unit dims and merge dims that are contiguous with each other in the source.
fn simplify(shape: &[usize], st: &[isize]) -> (Vec<usize>, Vec<isize>) {
    let mut sh: Vec<usize> = Vec::with_capacity(shape.len());
    let mut ss: Vec<isize> = Vec::with_capacity(shape.len());
    for (&d, &s) in shape.iter().zip(st) {
        if d == 1 {
            continue;
        }
        if let (Some(pd), Some(ps)) = (sh.last_mut(), ss.last_mut()) {
            if *ps == s * d as isize {
                *pd *= d;
                *ps = s;
                continue;
            }
        }
        sh.push(d);
        ss.push(s);
    }
    (sh, ss)
}

fn copy_run<T: Item>(src: &[T], off: isize, step: isize, dst: &mut [T]) {
    let o = off as usize;
    match step {
        1 => dst.clone_from_slice(&src[o..o + dst.len()]),
        0 => dst.fill(src[o].clone()),
        _ => {
            let mut p = off;
            for d in dst {
                *d = src[p as usize].clone();
                p += step;
            }
        }
    }
}

/// Advance a multi-index by one, keeping `off` = Σ idx·strides.
#[inline]
fn step_index(idx: &mut [usize], shape: &[usize], st: &[isize], off: &mut isize) {
    for k in (0..idx.len()).rev() {
        idx[k] += 1;
        *off += st[k];
        if idx[k] < shape[k] {
            return;
        }
        *off -= st[k] * shape[k] as isize;
        idx[k] = 0;
    }
}

/// Fill `dst` (row-major over `shape`) from the affine view `src[base + Σ i_k·strides_k]`.
/// Every view position must lie inside `src`.
pub(crate) fn strided_copy<T: Item>(
    src: &[T],
    base: usize,
    shape: &[usize],
    st: &[isize],
    dst: &mut [T],
) {
    if dst.is_empty() {
        return;
    }
    let (sh, st) = simplify(shape, st);
    let r = sh.len();
    if r == 0 {
        dst[0] = src[base].clone();
        return;
    }
    let par = dst.len() >= PAR_MIN;
    if r >= 2 && st[r - 1] != 1 && st[r - 2] == 1 {
        return transpose_tiles(src, base as isize, &sh, &st, dst, par);
    }
    let n = sh[r - 1];
    let s = st[r - 1];
    let (osh, ost) = (&sh[..r - 1], &st[..r - 1]);
    let per = rows_per_task(dst.len() / n, par);
    for_chunks(dst, per * n, par, |ci, chunk| {
        let mut idx = unravel(ci * per, osh);
        let mut off = base as isize + idx.iter().zip(ost).map(|(&i, &s)| i as isize * s).sum::<isize>();
        for row in chunk.chunks_mut(n) {
            copy_run(src, off, s, row);
            step_index(&mut idx, osh, ost, &mut off);
        }
    });
}

/// The last two view dims are a transposed matrix (source stride 1 on the row axis): copy in
/// square tiles so both sides stay in cache.
fn transpose_tiles<T: Item>(
    src: &[T],
    base: isize,
    sh: &[usize],
    st: &[isize],
    dst: &mut [T],
    par: bool,
) {
    const TILE: usize = 32;
    let r = sh.len();
    let (a, b, sa, sb) = (sh[r - 2], sh[r - 1], st[r - 2], st[r - 1]);
    let (osh, ost) = (&sh[..r - 2], &st[..r - 2]);
    for_chunks(dst, a * b, par, |o, block| {
        let idx = unravel(o, osh);
        let off = base + idx.iter().zip(ost).map(|(&i, &s)| i as isize * s).sum::<isize>();
        for_chunks(block, TILE * b, par, |t, rows| {
            let i0 = t * TILE;
            let nr = rows.len() / b;
            for j0 in (0..b).step_by(TILE) {
                let j1 = (j0 + TILE).min(b);
                for i in 0..nr {
                    let srow = off + (i0 + i) as isize * sa;
                    let drow = &mut rows[i * b..(i + 1) * b];
                    for j in j0..j1 {
                        drow[j] = src[(srow + j as isize * sb) as usize].clone();
                    }
                }
            }
        });
    });
}

/// A new tensor (same dtype as `t`) holding the affine view of `t` described by `shape`,
/// `st` and `base` (see [`strided_copy`]).
pub(crate) fn view_copy(t: &Tensor, base: usize, shape: &[usize], st: &[isize]) -> Result<Tensor> {
    with_item!(t.dtype(), T, {
        let src = T::items(t)?;
        T::build_full(t.dtype(), shape, |dst| {
            strided_copy(src, base, shape, st, dst);
            Ok(())
        })
    })
}

/// Source strides of `shape` as signed numbers.
pub(crate) fn istrides(shape: &[usize]) -> Vec<isize> {
    strides(shape).into_iter().map(|s| s as isize).collect()
}

/// `t` viewed as `view_shape` (same element count), with its axes permuted by `perm`.
pub(crate) fn permute(t: &Tensor, view_shape: &[usize], perm: &[usize]) -> Result<Tensor> {
    let st = istrides(view_shape);
    let shape: Vec<usize> = perm.iter().map(|&p| view_shape[p]).collect();
    let pst: Vec<isize> = perm.iter().map(|&p| st[p]).collect();
    view_copy(t, 0, &shape, &pst)
}

/// One contiguous piece of an output row built from an index map.
#[derive(Clone, Copy)]
enum Seg {
    /// `len` source elements starting at `src`.
    Copy { dst: usize, len: usize, src: usize },
    /// Source element `src` repeated `len` times.
    Repeat { dst: usize, len: usize, src: usize },
    /// The fill value `len` times.
    Fill { dst: usize, len: usize },
}

fn segments(map: &[isize]) -> Vec<Seg> {
    let mut segs: Vec<Seg> = Vec::new();
    let mut j = 0;
    while j < map.len() {
        let m = map[j];
        let mut k = j + 1;
        if m < 0 {
            while k < map.len() && map[k] < 0 {
                k += 1;
            }
            segs.push(Seg::Fill { dst: j, len: k - j });
        } else if k < map.len() && map[k] == m {
            while k < map.len() && map[k] == m {
                k += 1;
            }
            segs.push(Seg::Repeat { dst: j, len: k - j, src: m as usize });
        } else {
            while k < map.len() && map[k] == map[k - 1] + 1 && map[k] >= 0 {
                k += 1;
            }
            segs.push(Seg::Copy { dst: j, len: k - j, src: m as usize });
        }
        j = k;
    }
    segs
}

/// `dst[i_0, …, i_k] = src[map_0[i_0], …, map_k[i_k]]`, or `fill` where any map entry is negative.
/// The output shape is the map lengths; `src` has `in_shape`. Map entries must be in range.
pub(crate) fn gather_axes<T: Item>(
    src: &[T],
    in_shape: &[usize],
    maps: &[Vec<isize>],
    fill: &T,
    dst: &mut [T],
) {
    if dst.is_empty() {
        return;
    }
    let r = maps.len();
    if r == 0 {
        dst[0] = src[0].clone();
        return;
    }
    let ist = istrides(in_shape);
    let n = maps[r - 1].len();
    let segs = segments(&maps[r - 1]);
    let osh: Vec<usize> = maps[..r - 1].iter().map(|m| m.len()).collect();
    let par = dst.len() >= PAR_MIN;
    let per = rows_per_task(dst.len() / n, par);
    // A last-axis map that repeats each source element `k` times (nearest upsampling by an
    // integer factor) is done as one tight loop instead of a segment per source element.
    let uniform = uniform_repeat(&maps[r - 1]);
    for_chunks(dst, per * n, par, |ci, chunk| {
        let mut idx = unravel(ci * per, &osh);
        let mut prev: Option<isize> = None;
        for ri in 0..chunk.len() / n {
            let (done, rest) = chunk.split_at_mut(ri * n);
            let row = &mut rest[..n];
            let mut off: isize = 0;
            for (k, &i) in idx.iter().enumerate() {
                let m = maps[k][i];
                if m < 0 {
                    off = -1;
                    break;
                }
                off += m * ist[k];
            }
            if prev == Some(off) {
                // The same source row as the row before (an outer axis repeats): copy it.
                row.clone_from_slice(&done[(ri - 1) * n..]);
            } else if off < 0 {
                row.fill(fill.clone());
            } else if let Some((k, first)) = uniform {
                let o = off as usize + first;
                for (d, v) in row.chunks_exact_mut(k).zip(&src[o..o + n / k]) {
                    d.fill(v.clone());
                }
            } else {
                let o = off as usize;
                for s in &segs {
                    match *s {
                        Seg::Copy { dst, len, src: si } => {
                            row[dst..dst + len].clone_from_slice(&src[o + si..o + si + len])
                        }
                        Seg::Repeat { dst, len, src: si } => {
                            row[dst..dst + len].fill(src[o + si].clone())
                        }
                        Seg::Fill { dst, len } => row[dst..dst + len].fill(fill.clone()),
                    }
                }
            }
            prev = Some(off);
            for k in (0..idx.len()).rev() {
                idx[k] += 1;
                if idx[k] < osh[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
    });
}

/// `Some((k, first))` when `map` is `first, first (k times), first + 1 (k times), …` covering
/// its whole length, with k ≥ 2.
fn uniform_repeat(map: &[isize]) -> Option<(usize, usize)> {
    let first = *map.first()?;
    let k = map.iter().take_while(|&&m| m == first).count();
    if first < 0 || k < 2 || !map.len().is_multiple_of(k) {
        return None;
    }
    map.iter().enumerate().all(|(j, &m)| m == first + (j / k) as isize).then_some((k, first as usize))
}

/// The single element of `t` as an `Item` (for fill values given as tensors).
pub(crate) fn first_item<T: Item>(t: &Tensor) -> Result<T> {
    T::items(t)?
        .first()
        .cloned()
        .ok_or_else(|| Error::Shape("expected a one-element tensor, got an empty one".into()))
}

// ---------------------------------------------------------------------------------------------
// Shape-like inputs and attributes
// ---------------------------------------------------------------------------------------------

/// An integer list from input `i` if present, else from attribute `name`.
pub(crate) fn ints_input_or_attr(
    ctx: &OpCtx,
    inputs: &[Option<Tensor>],
    i: usize,
    name: &str,
) -> Result<Option<Vec<i64>>> {
    match ctx.opt_input(inputs, i) {
        Some(t) => Ok(Some(t.to_i64_vec()?)),
        None => Ok(ctx.attr_ints(name)),
    }
}

/// Dimensions from an i64 list, rejecting negatives.
pub(crate) fn dims_from(v: &[i64], what: &str) -> Result<Vec<usize>> {
    v.iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| Error::Shape(format!("{what} holds a negative size {d}")))
        })
        .collect()
}

/// Normalise a list of possibly negative axes against `rank`, rejecting duplicates.
pub(crate) fn norm_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = norm_axis(a, rank)?;
        if out.contains(&n) {
            return Err(Error::Shape(format!("axis {a} appears twice in {axes:?}")));
        }
        out.push(n);
    }
    Ok(out)
}

fn i64_tensor(shape: &[usize], v: Vec<i64>) -> Result<Tensor> {
    Tensor::from_vec(shape, v)
}

// ---------------------------------------------------------------------------------------------
// Reshaping views
// ---------------------------------------------------------------------------------------------

fn reshape(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let spec = ctx.input(inputs, 1)?.to_i64_vec()?;
    let allowzero = ctx.attr_i("allowzero", 0) != 0;
    Ok(vec![x.reshape(&reshape_dims(x.shape(), &spec, allowzero)?)?])
}

/// Resolve a Reshape shape spec: 0 copies the input dim (unless `allowzero`), -1 is inferred.
pub(crate) fn reshape_dims(input: &[usize], spec: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(i).ok_or_else(|| {
                Error::Shape(format!("reshape spec {spec:?} copies dim {i} of a rank-{} input", input.len()))
            })?),
            d if d >= 0 => out.push(d as usize),
            _ => return Err(Error::Shape(format!("invalid reshape spec {spec:?}"))),
        }
    }
    let total = numel(input);
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 {
            if total != 0 {
                return Err(Error::Shape(format!("cannot infer -1 in {spec:?} for {input:?}")));
            }
            out[i] = 0;
        } else {
            if !total.is_multiple_of(known) {
                return Err(Error::Shape(format!("cannot reshape {input:?} to {spec:?}")));
            }
            out[i] = total / known;
        }
    }
    if numel(&out) != total {
        return Err(Error::Shape(format!("cannot reshape {input:?} to {spec:?}")));
    }
    Ok(out)
}

fn flatten(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let r = x.rank() as i64;
    let a = ctx.attr_i("axis", 1);
    let a = if a < 0 { a + r } else { a };
    if a < 0 || a > r {
        return Err(Error::Shape(format!("Flatten axis {a} is out of range for rank {r}")));
    }
    let outer: usize = x.shape()[..a as usize].iter().product();
    let inner: usize = x.shape()[a as usize..].iter().product();
    Ok(vec![x.reshape(&[outer, inner])?])
}

fn squeeze(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let axes = ints_input_or_attr(ctx, inputs, 1, "axes")?;
    let shape = x.shape();
    let out: Vec<usize> = match axes.filter(|a| !a.is_empty()) {
        None => shape.iter().copied().filter(|&d| d != 1).collect(),
        Some(axes) => {
            let axes = norm_axes(&axes, shape.len())?;
            for &a in &axes {
                if shape[a] != 1 {
                    return Err(Error::Shape(format!("cannot squeeze axis {a} of size {}", shape[a])));
                }
            }
            shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
        }
    };
    Ok(vec![x.reshape(&out)?])
}

fn unsqueeze(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let axes = ints_input_or_attr(ctx, inputs, 1, "axes")?
        .ok_or_else(|| Error::Other("Unsqueeze needs axes".into()))?;
    let rank = x.rank() + axes.len();
    let axes = norm_axes(&axes, rank)?;
    let mut src = x.shape().iter();
    let out: Vec<usize> =
        (0..rank).map(|i| if axes.contains(&i) { 1 } else { *src.next().unwrap_or(&1) }).collect();
    Ok(vec![x.reshape(&out)?])
}

fn shape_op(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let r = x.rank() as i64;
    let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = clampi(ctx.attr_i("start", 0));
    let end = clampi(ctx.attr_i("end", r));
    let dims: Vec<i64> =
        x.shape()[start..end.max(start)].iter().map(|&d| d as i64).collect();
    Ok(vec![i64_tensor(&[dims.len()], dims)?])
}

fn size_op(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![Tensor::scalar(ctx.input(inputs, 0)?.len() as i64)])
}

// ---------------------------------------------------------------------------------------------
// Producers
// ---------------------------------------------------------------------------------------------

fn constant_of_shape(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let shape = dims_from(&ctx.input(inputs, 0)?.to_i64_vec()?, "ConstantOfShape shape")?;
    let value = match ctx.attr_tensor("value")? {
        Some(v) => v,
        None => Tensor::scalar(0f32),
    };
    let dt = value.dtype();
    let out = with_item!(dt, T, {
        let v: T = first_item(&value)?;
        T::build(dt, &shape, |d| {
            d.fill(v);
            Ok(())
        })?
    });
    Ok(vec![out])
}

fn range(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let (s, l, d) = (ctx.input(inputs, 0)?, ctx.input(inputs, 1)?, ctx.input(inputs, 2)?);
    let dt = s.dtype();
    let out = if dt.is_int() {
        let one = |t: &Tensor| -> Result<i128> {
            t.to_i64_vec()?.first().map(|&v| v as i128).ok_or_else(|| Error::Shape("Range needs scalars".into()))
        };
        let (start, limit, delta) = (one(s)?, one(l)?, one(d)?);
        if delta == 0 {
            return Err(Error::Other("Range delta is zero".into()));
        }
        let span = limit - start;
        let n = if (span > 0) == (delta > 0) && span != 0 {
            (span.abs() + delta.abs() - 1) / delta.abs()
        } else {
            0
        };
        crate::with_int!(dt, T, {
            let v: Vec<T> = (0..n).map(|i| (start + i * delta) as T).collect();
            Tensor::from_slice_as(dt, &[v.len()], &v)?
        })
    } else {
        let one = |t: &Tensor| -> Result<f64> {
            t.to_f64_vec()?.first().copied().ok_or_else(|| Error::Shape("Range needs scalars".into()))
        };
        let (start, limit, delta) = (one(s)?, one(l)?, one(d)?);
        if delta == 0.0 || !delta.is_finite() {
            return Err(Error::Other(format!("Range delta {delta} is not usable")));
        }
        let n = ((limit - start) / delta).ceil().max(0.0) as usize;
        crate::with_float!(dt, T, {
            let v: Vec<T> = (0..n).map(|i| <T as Scalar>::from_f64(start + i as f64 * delta)).collect();
            Tensor::from_slice_as(dt, &[n], &v)?
        })
    };
    Ok(vec![out])
}

fn eye_like(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    if x.rank() != 2 {
        return Err(Error::Shape(format!("EyeLike needs a 2-D input, got {:?}", x.shape())));
    }
    let dt = match ctx.attr_i_opt("dtype") {
        Some(c) => DType::from_onnx(c as i32).ok_or_else(|| ctx.unsupported(format!("dtype {c}")))?,
        None => x.dtype(),
    };
    let one = scalar_from_f64(dt, 1.0)?;
    let (rows, cols) = (x.shape()[0], x.shape()[1]);
    let k = ctx.attr_i("k", 0);
    let out = with_item!(dt, T, {
        let one: T = first_item(&one)?;
        T::build(dt, &[rows, cols], |d| {
            for i in 0..rows {
                let j = i as i64 + k;
                if j >= 0 && (j as usize) < cols {
                    d[i * cols + j as usize] = one.clone();
                }
            }
            Ok(())
        })?
    });
    Ok(vec![out])
}

// ---------------------------------------------------------------------------------------------
// Movers
// ---------------------------------------------------------------------------------------------

fn transpose(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let r = x.rank();
    let perm: Vec<usize> = match ctx.attr_ints("perm") {
        Some(p) => {
            let p = norm_axes(&p, r)?;
            if p.len() != r {
                return Err(Error::Shape(format!("perm {p:?} does not fit rank {r}")));
            }
            p
        }
        None => (0..r).rev().collect(),
    };
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(vec![x.clone()]);
    }
    Ok(vec![permute(x, x.shape(), &perm)?])
}

fn expand(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let want = dims_from(&ctx.input(inputs, 1)?.to_i64_vec()?, "Expand shape")?;
    let out = broadcast_shapes(&[x.shape(), &want])?;
    if out == x.shape() {
        return Ok(vec![x.clone()]);
    }
    let st: Vec<isize> = broadcast_strides(x.shape(), &out).into_iter().map(|s| s as isize).collect();
    Ok(vec![view_copy(x, 0, &out, &st)?])
}

fn tile(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let reps = dims_from(&ctx.input(inputs, 1)?.to_i64_vec()?, "Tile repeats")?;
    if reps.len() != x.rank() {
        return Err(Error::Shape(format!("Tile repeats {reps:?} do not match rank {}", x.rank())));
    }
    // View the output as [r0, d0, r1, d1, …] where the repeat axes have stride 0.
    let st = istrides(x.shape());
    let mut vshape = Vec::with_capacity(2 * reps.len());
    let mut vst = Vec::with_capacity(2 * reps.len());
    for i in 0..reps.len() {
        vshape.extend([reps[i], x.shape()[i]]);
        vst.extend([0, st[i]]);
    }
    let out_shape: Vec<usize> = x.shape().iter().zip(&reps).map(|(d, r)| d * r).collect();
    Ok(vec![view_copy(x, 0, &vshape, &vst)?.reshape(&out_shape)?])
}

fn concat(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let parts: Vec<&Tensor> = inputs.iter().flatten().collect();
    let first = *parts.first().ok_or_else(|| Error::Other("Concat needs inputs".into()))?;
    if parts.len() == 1 {
        return Ok(vec![first.clone()]);
    }
    let r = first.rank();
    let axis = norm_axis(ctx.attr_i("axis", 0), r)?;
    let mut out_shape = first.shape().to_vec();
    out_shape[axis] = 0;
    for p in &parts {
        let ok = p.rank() == r
            && p.dtype() == first.dtype()
            && (0..r).all(|i| i == axis || p.shape()[i] == first.shape()[i]);
        if !ok {
            return Err(Error::Shape(format!(
                "Concat inputs {:?} and {:?} do not match on axis {axis}",
                first.shape(),
                p.shape()
            )));
        }
        out_shape[axis] += p.shape()[axis];
    }
    Ok(vec![concat_along(&parts, axis, &out_shape)?])
}

/// Concatenate same-rank, same-dtype tensors along `axis` into `out_shape`.
pub(crate) fn concat_along(parts: &[&Tensor], axis: usize, out_shape: &[usize]) -> Result<Tensor> {
    let dt = parts[0].dtype();
    let outer: usize = out_shape[..axis].iter().product();
    let row: usize = out_shape[axis..].iter().product();
    with_item!(dt, T, {
        let srcs: Vec<(&[T], usize)> = parts
            .iter()
            .map(|p| Ok((T::items(p)?, p.shape()[axis..].iter().product::<usize>())))
            .collect::<Result<_>>()?;
        T::build_full(dt, out_shape, |dst| {
            if row == 0 || outer == 0 {
                return Ok(());
            }
            let par = dst.len() >= PAR_MIN;
            let per = rows_per_task(outer, par);
            for_chunks(dst, per * row, par, |ci, chunk| {
                for (k, drow) in chunk.chunks_mut(row).enumerate() {
                    let o = ci * per + k;
                    let mut at = 0;
                    for (s, n) in &srcs {
                        drow[at..at + n].clone_from_slice(&s[o * n..(o + 1) * n]);
                        at += n;
                    }
                }
            });
            Ok(())
        })
    })
}

/// `t` restricted to `[start, start+len)` along `axis` (a copy).
pub(crate) fn narrow(t: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    let mut shape = t.shape().to_vec();
    if start + len > shape[axis] {
        return Err(Error::Shape(format!("range {start}+{len} exceeds axis {axis} of {shape:?}")));
    }
    if start == 0 && len == shape[axis] {
        return Ok(t.clone());
    }
    let st = istrides(&shape);
    shape[axis] = len;
    view_copy(t, start * st[axis] as usize, &shape, &st)
}

fn split(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let axis = norm_axis(ctx.attr_i("axis", 0), x.rank())?;
    let dim = x.shape()[axis];
    let sizes: Vec<usize> = match ints_input_or_attr(ctx, inputs, 1, "split")? {
        Some(s) if !s.is_empty() => dims_from(&s, "split")?,
        _ => {
            let n = ctx.attr_i_opt("num_outputs").map(|n| n as usize).unwrap_or(ctx.num_outputs());
            if n == 0 {
                return Err(Error::Other("Split has no outputs".into()));
            }
            let chunk = dim.div_ceil(n);
            (0..n).map(|i| chunk.min(dim.saturating_sub(i * chunk))).collect()
        }
    };
    if sizes.iter().sum::<usize>() != dim {
        return Err(Error::Shape(format!("split sizes {sizes:?} do not sum to {dim}")));
    }
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            let t = narrow(x, axis, at, n);
            at += n;
            t
        })
        .collect()
}

fn trilu(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    if x.rank() < 2 {
        return Err(Error::Shape("Trilu needs rank >= 2".into()));
    }
    let k = match ctx.opt_input(inputs, 1) {
        Some(t) => *t.to_i64_vec()?.first().ok_or_else(|| Error::Shape("Trilu k is empty".into()))?,
        None => 0,
    };
    let upper = ctx.attr_i("upper", 1) != 0;
    let (rows, cols) = (x.shape()[x.rank() - 2], x.shape()[x.rank() - 1]);
    let dt = x.dtype();
    let out = with_item!(dt, T, {
        let src = T::items(x)?;
        T::build(dt, x.shape(), |dst| {
            if cols == 0 {
                return Ok(());
            }
            for (m, (d, s)) in dst.chunks_mut(cols).zip(src.chunks(cols)).enumerate() {
                let i = (m % rows.max(1)) as i64;
                // Columns kept: j - i >= k (upper) or j - i <= k (lower).
                let edge = (i + k).clamp(0, cols as i64) as usize;
                let (a, b) = if upper { (edge, cols) } else { (0, (i + k + 1).clamp(0, cols as i64) as usize) };
                d[a..b].clone_from_slice(&s[a..b]);
            }
            Ok(())
        })?
    });
    Ok(vec![out])
}

fn block_input(ctx: &OpCtx, x: &Tensor) -> Result<(usize, [usize; 4])> {
    let b = ctx.attr_i("blocksize", 0);
    if b <= 0 {
        return Err(Error::Other(format!("blocksize {b} must be positive")));
    }
    let s = x.shape();
    if s.len() != 4 {
        return Err(Error::Shape(format!("expected a 4-D input, got {s:?}")));
    }
    Ok((b as usize, [s[0], s[1], s[2], s[3]]))
}

fn depth_to_space(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (b, [n, c, h, w]) = block_input(ctx, x)?;
    if c % (b * b) != 0 {
        return Err(Error::Shape(format!("channels {c} not divisible by blocksize² {}", b * b)));
    }
    let c2 = c / (b * b);
    let y = match ctx.attr_s("mode", "DCR").as_str() {
        "DCR" => permute(x, &[n, b, b, c2, h, w], &[0, 3, 4, 1, 5, 2])?,
        "CRD" => permute(x, &[n, c2, b, b, h, w], &[0, 1, 4, 2, 5, 3])?,
        m => return Err(ctx.unsupported(format!("mode {m}"))),
    };
    Ok(vec![y.reshape(&[n, c2, h * b, w * b])?])
}

fn space_to_depth(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (b, [n, c, h, w]) = block_input(ctx, x)?;
    if h % b != 0 || w % b != 0 {
        return Err(Error::Shape(format!("spatial dims {h}x{w} not divisible by blocksize {b}")));
    }
    let y = permute(x, &[n, c, h / b, b, w / b, b], &[0, 3, 5, 1, 2, 4])?;
    Ok(vec![y.reshape(&[n, c * b * b, h / b, w / b])?])
}

fn reverse_sequence(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let lens = ctx.input(inputs, 1)?.to_i64_vec()?;
    if x.rank() < 2 {
        return Err(Error::Shape("ReverseSequence needs rank >= 2".into()));
    }
    let ta = norm_axis(ctx.attr_i("time_axis", 0), x.rank())?;
    let ba = norm_axis(ctx.attr_i("batch_axis", 1), x.rank())?;
    if ta + ba != 1 {
        return Err(ctx.unsupported(format!("time_axis {ta} with batch_axis {ba}")));
    }
    let (t_len, b_len) = (x.shape()[ta], x.shape()[ba]);
    if lens.len() != b_len {
        return Err(Error::Shape(format!("{} sequence lengths for batch {b_len}", lens.len())));
    }
    let inner: usize = x.shape()[2..].iter().product();
    let at = |t: usize, b: usize| if ta == 0 { t * b_len + b } else { b * t_len + t } * inner;
    let dt = x.dtype();
    let out = with_item!(dt, T, {
        let src = T::items(x)?;
        T::build(dt, x.shape(), |dst| {
            for (b, &l) in lens.iter().enumerate() {
                let l = l.clamp(0, t_len as i64) as usize;
                for t in 0..t_len {
                    let from = if t < l { l - 1 - t } else { t };
                    let (d, s) = (at(t, b), at(from, b));
                    dst[d..d + inner].clone_from_slice(&src[s..s + inner]);
                }
            }
            Ok(())
        })?
    });
    Ok(vec![out])
}

fn center_crop_pad(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let want = dims_from(&ctx.input(inputs, 1)?.to_i64_vec()?, "CenterCropPad shape")?;
    let axes = match ctx.attr_ints("axes") {
        Some(a) => norm_axes(&a, x.rank())?,
        None => (0..x.rank()).collect(),
    };
    if axes.len() != want.len() {
        return Err(Error::Shape(format!("shape {want:?} does not match axes {axes:?}")));
    }
    let mut maps: Vec<Vec<isize>> = x.shape().iter().map(|&d| (0..d as isize).collect()).collect();
    for (&a, &target) in axes.iter().zip(&want) {
        let dim = x.shape()[a];
        // Crop start in the input, pad start in the output (odd leftovers go to the end).
        let (cs, ps) = if target <= dim { ((dim - target) / 2, 0) } else { (0, (target - dim) / 2) };
        let len = dim.min(target);
        maps[a] = (0..target)
            .map(|o| if o >= ps && o < ps + len { (cs + o - ps) as isize } else { -1 })
            .collect();
    }
    Ok(vec![gather_maps(x, &maps, None)?])
}

/// [`gather_axes`] over a whole tensor; `fill` (a one-element tensor of the same dtype) defaults
/// to zero / the empty string.
pub(crate) fn gather_maps(x: &Tensor, maps: &[Vec<isize>], fill: Option<&Tensor>) -> Result<Tensor> {
    let dt = x.dtype();
    let shape: Vec<usize> = maps.iter().map(|m| m.len()).collect();
    with_item!(dt, T, {
        let src = T::items(x)?;
        let f: T = match fill {
            Some(t) => first_item(t)?,
            None => T::default(),
        };
        T::build_full(dt, &shape, |dst| {
            gather_axes(src, x.shape(), maps, &f, dst);
            Ok(())
        })
    })
}

fn col2im(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let image = dims_from(&ctx.input(inputs, 1)?.to_i64_vec()?, "image_shape")?;
    let block = dims_from(&ctx.input(inputs, 2)?.to_i64_vec()?, "block_shape")?;
    let nd = image.len();
    if block.len() != nd || x.rank() != 3 {
        return Err(Error::Shape(format!("Col2Im: input {:?}, image {image:?}, block {block:?}", x.shape())));
    }
    let get = |name: &str, n: usize, d: i64| -> Vec<i64> { ctx.attr_ints(name).unwrap_or_else(|| vec![d; n]) };
    let (dil, pads, strd) = (get("dilations", nd, 1), get("pads", 2 * nd, 0), get("strides", nd, 1));
    if dil.len() != nd || pads.len() != 2 * nd || strd.len() != nd {
        return Err(Error::Shape("Col2Im attribute lengths do not match the image rank".into()));
    }
    let kprod: usize = block.iter().product();
    let (n, ck, l) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    if kprod == 0 || ck % kprod != 0 {
        return Err(Error::Shape(format!("Col2Im channels {ck} not divisible by block {block:?}")));
    }
    let c = ck / kprod;
    let nblocks: Vec<i64> = (0..nd)
        .map(|d| {
            (image[d] as i64 + pads[d] + pads[d + nd] - dil[d] * (block[d] as i64 - 1) - 1) / strd[d] + 1
        })
        .collect();
    if nblocks.iter().any(|&b| b < 1) || nblocks.iter().product::<i64>() != l as i64 {
        return Err(Error::Shape(format!("Col2Im: {l} columns do not match {nblocks:?} blocks")));
    }
    let mut oshape = vec![n, c];
    oshape.extend(&image);
    let img: usize = image.iter().product();
    let ist = strides(&image);
    // Top-left image coordinate of each sliding block, per spatial dim.
    let nb: Vec<usize> = nblocks.iter().map(|&b| b as usize).collect();
    let mut origins: Vec<i64> = Vec::with_capacity(l * nd);
    for li in 0..l {
        let idx = unravel(li, &nb);
        origins.extend((0..nd).map(|d| idx[d] as i64 * strd[d] - pads[d]));
    }
    let out = crate::with_numeric!(x.dtype(), T, {
        let src = x.view::<T>()?;
        let mut acc = vec![T::default(); n * c * img];
        for (plane, dst) in acc.chunks_mut(img).enumerate() {
            let (bn, cc) = (plane / c, plane % c);
            for k in 0..kprod {
                let kidx = unravel(k, &block);
                let col = &src[((bn * ck) + cc * kprod + k) * l..][..l];
                for (li, &v) in col.iter().enumerate() {
                    let org = &origins[li * nd..][..nd];
                    let mut off = 0usize;
                    let mut inside = true;
                    for d in 0..nd {
                        let p = org[d] + kidx[d] as i64 * dil[d];
                        if p < 0 || p >= image[d] as i64 {
                            inside = false;
                            break;
                        }
                        off += p as usize * ist[d];
                    }
                    if inside {
                        dst[off] = dst[off].add(v);
                    }
                }
            }
        }
        Tensor::from_slice_as(x.dtype(), &oshape, &acc)?
    });
    Ok(vec![out])
}

#[cfg(test)]
mod tests {

    #[test]
    fn gather_axes_matches_the_definition_on_repeats_fills_and_copies() {
        // Integer upsampling (the uniform path and the repeated-row copy), an irregular map, and
        // out-of-range (-1) entries on either axis.
        let src: Vec<u32> = (0..2 * 3 * 4).collect();
        let cases: [Vec<Vec<isize>>; 4] = [
            vec![vec![0, 1], vec![0, 0, 1, 1, 2, 2], vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]],
            vec![vec![1], vec![2, 2, 0, -1], vec![3, 1, 1, 2, 0]],
            vec![vec![0, 0, 1], vec![-1, 1, 1], vec![1, 1, 2, 2, 3, 3]],
            vec![vec![1, -1], vec![0, 1, 2], vec![0, 1, 2, 3]],
        ];
        for maps in cases {
            let shape: Vec<usize> = maps.iter().map(|m| m.len()).collect();
            let mut got = vec![0u32; shape.iter().product()];
            gather_axes(&src, &[2, 3, 4], &maps, &77, &mut got);
            let mut want = Vec::new();
            for &a in &maps[0] {
                for &b in &maps[1] {
                    for &c in &maps[2] {
                        want.push(if a < 0 || b < 0 || c < 0 { 77 } else { src[(a * 12 + b * 4 + c) as usize] });
                    }
                }
            }
            assert_eq!(got, want, "maps {maps:?}");
        }
    }
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    pub(crate) fn step(op: &str, opset: i64, attrs: Vec<Attr>) -> Step {
        Step { op: op.into(), opset, outputs: vec![0], attrs, ..Default::default() }
    }

    pub(crate) fn ai(name: &str, v: i64) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Int as i32, i: v, ..Default::default() }
    }
    pub(crate) fn ais(name: &str, v: &[i64]) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Ints as i32, ints: v.to_vec(), ..Default::default() }
    }
    pub(crate) fn astr(name: &str, v: &str) -> Attr {
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

    #[test]
    fn reshape_specs() {
        assert_eq!(reshape_dims(&[2, 3, 4], &[0, -1], false).unwrap(), vec![2, 12]);
        assert_eq!(reshape_dims(&[0, 3, 4], &[3, 4, 0], true).unwrap(), vec![3, 4, 0]);
        assert!(reshape_dims(&[2, 3], &[4, -1], false).is_err());
        assert!(reshape_dims(&[2, 3], &[-1, -1], false).is_err());
    }

    #[test]
    fn transpose_all_paths() {
        // 2-D tiled path, checked against the definition, for sizes that straddle tiles.
        for &(a, b) in &[(3usize, 5usize), (40, 70), (300, 200)] {
            let x = f32s(&[a, b]);
            let y = run(transpose, &step("Transpose", 13, vec![]), vec![Some(x)]).remove(0);
            assert_eq!(y.shape(), &[b, a]);
            let v = y.view::<f32>().unwrap();
            for i in 0..b {
                for j in 0..a {
                    assert_eq!(v[i * a + j], (j * b + i) as f32);
                }
            }
        }
        let x = f32s(&[2, 3, 4]);
        let y = run(transpose, &step("Transpose", 13, vec![ais("perm", &[1, 0, 2])]), vec![Some(x)]).remove(0);
        assert_eq!(y.shape(), &[3, 2, 4]);
        assert_eq!(&y.view::<f32>().unwrap()[..8], &[0., 1., 2., 3., 12., 13., 14., 15.]);
        let s = Tensor::from_strings(&[2, 2], vec!["a".into(), "b".into(), "c".into(), "d".into()]).unwrap();
        let y = run(transpose, &step("Transpose", 13, vec![]), vec![Some(s)]).remove(0);
        assert_eq!(y.strings().unwrap(), &["a", "c", "b", "d"]);
    }

    #[test]
    fn tile_expand_concat_split() {
        let x = f32s(&[2, 2]);
        let y = run(tile, &step("Tile", 13, vec![]), vec![Some(x.clone()), i64s(&[1, 2])]).remove(0);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 1., 0., 1., 2., 3., 2., 3.]);
        let y = run(expand, &step("Expand", 13, vec![]), vec![Some(f32s(&[3, 1])), i64s(&[2, 1, 2])]).remove(0);
        assert_eq!(y.shape(), &[2, 3, 2]);
        assert_eq!(&y.view::<f32>().unwrap()[..6], &[0., 0., 1., 1., 2., 2.]);
        let y = run(concat, &step("Concat", 13, vec![ai("axis", -1)]), vec![Some(x.clone()), Some(f32s(&[2, 0])), Some(f32s(&[2, 1]))]).remove(0);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 1., 0., 2., 3., 1.]);
        let mut s = step("Split", 18, vec![ai("axis", 1), ai("num_outputs", 2)]);
        s.outputs = vec![0, 1];
        let parts = run(split, &s, vec![Some(f32s(&[2, 3]))]);
        assert_eq!(parts[0].view::<f32>().unwrap(), &[0., 1., 3., 4.]);
        assert_eq!(parts[1].view::<f32>().unwrap(), &[2., 5.]);
    }

    #[test]
    fn trilu_depth_space() {
        let x = f32s(&[3, 3]);
        let y = run(trilu, &step("Trilu", 14, vec![ai("upper", 0)]), vec![Some(x.clone()), Some(Tensor::scalar(-1i64))]).remove(0);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 0., 0., 3., 0., 0., 6., 7., 0.]);
        let y = run(trilu, &step("Trilu", 14, vec![]), vec![Some(x)]).remove(0);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 1., 2., 0., 4., 5., 0., 0., 8.]);
        let x = f32s(&[1, 8, 1, 1]);
        let y = run(depth_to_space, &step("DepthToSpace", 13, vec![ai("blocksize", 2)]), vec![Some(x.clone())]).remove(0);
        assert_eq!(y.shape(), &[1, 2, 2, 2]);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 2., 4., 6., 1., 3., 5., 7.]);
        let z = run(space_to_depth, &step("SpaceToDepth", 13, vec![ai("blocksize", 2)]), vec![Some(y)]).remove(0);
        assert_eq!(z.shape(), &[1, 8, 1, 1]);
        assert_eq!(z.view::<f32>().unwrap(), &[0., 1., 2., 3., 4., 5., 6., 7.]);
        let _ = astr("mode", "CRD");
    }

    #[test]
    fn producers() {
        let y = run(range, &step("Range", 11, vec![]), vec![Some(Tensor::scalar(10i32)), Some(Tensor::scalar(4i32)), Some(Tensor::scalar(-3i32))]).remove(0);
        assert_eq!(y.view::<i32>().unwrap(), &[10, 7]);
        let y = run(eye_like, &step("EyeLike", 9, vec![ai("k", 1)]), vec![Some(f32s(&[2, 3]))]).remove(0);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 1., 0., 0., 0., 1.]);
        let y = run(shape_op, &step("Shape", 15, vec![ai("start", -2)]), vec![Some(f32s(&[2, 3, 4]))]).remove(0);
        assert_eq!(y.view::<i64>().unwrap(), &[3, 4]);
        let y = run(center_crop_pad, &step("CenterCropPad", 18, vec![]), vec![Some(f32s(&[3, 2])), i64s(&[1, 4])]).remove(0);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 2., 3., 0.]);
    }

    #[test]
    fn movers_cover_every_dtype() {
        for dt in DType::ALL {
            if dt == DType::String {
                continue;
            }
            let sz = dt.size();
            // Element e has every byte equal to e (bool: e % 2), so moves are visible bytewise.
            let code = |e: usize| if dt == DType::Bool { (e % 2) as u8 } else { e as u8 };
            let bytes: Vec<u8> = (0..6).flat_map(|e| vec![code(e); sz]).collect();
            let x = Tensor::from_bytes(dt, &[2, 3], &bytes).unwrap();
            let y = run(transpose, &step("Transpose", 13, vec![]), vec![Some(x.clone())]).remove(0);
            let want: Vec<u8> = [0, 3, 1, 4, 2, 5].iter().flat_map(|&e| vec![code(e); sz]).collect();
            assert_eq!((y.dtype(), y.shape(), y.bytes()), (dt, &[3usize, 2][..], &want[..]), "{dt}");
            let y = run(concat, &step("Concat", 13, vec![ai("axis", 1)]), vec![Some(x.clone()), Some(x)]).remove(0);
            let want: Vec<u8> = [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5].iter().flat_map(|&e| vec![code(e); sz]).collect();
            assert_eq!(y.bytes(), &want[..], "{dt}");
        }
    }
}
