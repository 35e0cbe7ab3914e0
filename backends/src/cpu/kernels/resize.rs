//! Resampling kernels: Resize (opset 10 and 11+), the deprecated Upsample, GridSample and
//! AffineGrid. Resize works one axis at a time, in axis order, as the ONNX reference does:
//! nearest mode becomes per-axis index maps (any dtype, no arithmetic), linear and cubic become
//! per-axis weight tables applied pass by pass in f32 (f64 for f64 inputs).

use std::ops::{Add, Mul};

use kiln_runtime::{DType, Error, Result, Tensor};

use super::shape::{for_chunks, gather_maps, scalar_from_f64, Scalar, PAR_MIN};
use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;

pub fn register(r: &mut Registry) {
    r.add("Resize", resize);
    r.add("Upsample", upsample);
    r.add("GridSample", grid_sample);
    r.add("AffineGrid", affine_grid);
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Coord {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfCropAndResize,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Nearest {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
    /// Opset < 11 (and Upsample): floor when upsampling, ceil when downsampling.
    Legacy,
}

struct Params {
    mode: Mode,
    coord: Coord,
    nearest: Nearest,
    cubic_a: f64,
    exclude_outside: bool,
    extrapolation: f64,
    antialias: bool,
}

/// What one axis becomes: output length, the scale used for coordinates, and the ROI.
struct AxisSpec {
    input: usize,
    output: usize,
    scale: f64,
    roi: (f64, f64),
}

impl AxisSpec {
    fn is_identity(&self) -> bool {
        (self.scale - 1.0).abs() < 1e-9
            && self.output == self.input
            && self.roi.0.abs() < 1e-9
            && (self.roi.1 - 1.0).abs() < 1e-9
    }

    /// Source coordinate of output index `y`, and whether it falls outside the crop (only
    /// tf_crop_and_resize extrapolates).
    fn source(&self, y: usize, coord: Coord) -> (f64, bool) {
        let (y, inp, s) = (y as f64, self.input as f64, self.scale);
        let out_f = s * inp;
        let x = match coord {
            Coord::HalfPixel => (y + 0.5) / s - 0.5,
            Coord::HalfPixelSymmetric => {
                let adjustment = self.output as f64 / out_f;
                inp / 2.0 * (1.0 - adjustment) + (y + 0.5) / s - 0.5
            }
            Coord::PytorchHalfPixel => {
                if out_f == 1.0 {
                    -0.5
                } else {
                    (y + 0.5) / s - 0.5
                }
            }
            Coord::AlignCorners => {
                if out_f == 1.0 {
                    0.0
                } else {
                    y * (inp - 1.0) / (out_f - 1.0)
                }
            }
            Coord::Asymmetric => y / s,
            Coord::TfCropAndResize => {
                let (r0, r1) = self.roi;
                let x = if out_f == 1.0 {
                    (r1 - r0) * (inp - 1.0) / 2.0
                } else {
                    y * (r1 - r0) * (inp - 1.0) / (out_f - 1.0)
                };
                let x = x + r0 * (inp - 1.0);
                return (x, x < 0.0 || x > inp - 1.0);
            }
        };
        (x, false)
    }
}

fn resize(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let r = x.rank();
    if ctx.opset() < 11 {
        let scales = ctx.input(inputs, 1)?.to_f64_vec()?;
        let p = legacy_params(ctx)?;
        let specs = specs_from_scales(x.shape(), &scales, &(0..r).collect::<Vec<_>>(), &[])?;
        return Ok(vec![run(x, &p, &specs)?]);
    }
    let p = params(ctx)?;
    let nonempty = |i: usize| ctx.opt_input(inputs, i).filter(|t| !t.is_empty());
    let axes: Vec<usize> = match ctx.attr_ints("axes") {
        Some(a) => super::shape::norm_axes(&a, r)?,
        None => (0..r).collect(),
    };
    // Only tf_crop_and_resize reads the ROI; other modes ignore whatever is passed.
    let roi = match nonempty(1) {
        Some(t) if p.coord == Coord::TfCropAndResize => t.to_f64_vec()?,
        _ => Vec::new(),
    };
    if !roi.is_empty() && roi.len() != 2 * axes.len() {
        return Err(Error::Shape(format!("roi has {} values for {} axes", roi.len(), axes.len())));
    }
    let specs = match (nonempty(2), nonempty(3)) {
        (Some(s), None) => specs_from_scales(x.shape(), &s.to_f64_vec()?, &axes, &roi)?,
        (None, Some(s)) => {
            let policy = ctx.attr_s("keep_aspect_ratio_policy", "stretch");
            specs_from_sizes(ctx, x.shape(), &s.to_i64_vec()?, &axes, &roi, &policy)?
        }
        _ => return Err(Error::Other("Resize needs exactly one of scales and sizes".into())),
    };
    Ok(vec![run(x, &p, &specs)?])
}

fn upsample(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let scales: Vec<f64> = match ctx.opt_input(inputs, 1) {
        Some(t) => t.to_f64_vec()?,
        None => ctx
            .attr_floats("scales")
            .ok_or_else(|| Error::Other("Upsample needs scales".into()))?
            .into_iter()
            .map(|s| s as f64)
            .collect(),
    };
    let p = legacy_params(ctx)?;
    let specs = specs_from_scales(x.shape(), &scales, &(0..x.rank()).collect::<Vec<_>>(), &[])?;
    Ok(vec![run(x, &p, &specs)?])
}

fn mode_of(ctx: &OpCtx) -> Result<Mode> {
    Ok(match ctx.attr_s("mode", "nearest").as_str() {
        "nearest" => Mode::Nearest,
        "linear" | "bilinear" | "trilinear" => Mode::Linear,
        "cubic" if ctx.op() == "Resize" && ctx.opset() >= 11 => Mode::Cubic,
        m => return Err(ctx.unsupported(format!("mode {m}"))),
    })
}

/// Resize-10 and Upsample: asymmetric coordinates, legacy nearest rounding.
fn legacy_params(ctx: &OpCtx) -> Result<Params> {
    Ok(Params {
        mode: mode_of(ctx)?,
        coord: Coord::Asymmetric,
        nearest: Nearest::Legacy,
        cubic_a: -0.75,
        exclude_outside: false,
        extrapolation: 0.0,
        antialias: false,
    })
}

fn params(ctx: &OpCtx) -> Result<Params> {
    let coord = match ctx.attr_s("coordinate_transformation_mode", "half_pixel").as_str() {
        "half_pixel" => Coord::HalfPixel,
        "half_pixel_symmetric" => Coord::HalfPixelSymmetric,
        "pytorch_half_pixel" => Coord::PytorchHalfPixel,
        "align_corners" => Coord::AlignCorners,
        "asymmetric" => Coord::Asymmetric,
        "tf_crop_and_resize" => Coord::TfCropAndResize,
        m => return Err(ctx.unsupported(format!("coordinate_transformation_mode {m}"))),
    };
    let nearest = match ctx.attr_s("nearest_mode", "round_prefer_floor").as_str() {
        "round_prefer_floor" => Nearest::RoundPreferFloor,
        "round_prefer_ceil" => Nearest::RoundPreferCeil,
        "floor" => Nearest::Floor,
        "ceil" => Nearest::Ceil,
        m => return Err(ctx.unsupported(format!("nearest_mode {m}"))),
    };
    let p = Params {
        mode: mode_of(ctx)?,
        coord,
        nearest,
        cubic_a: ctx.attr_f("cubic_coeff_a", -0.75) as f64,
        exclude_outside: ctx.attr_i("exclude_outside", 0) != 0,
        extrapolation: ctx.attr_f("extrapolation_value", 0.0) as f64,
        antialias: ctx.attr_i("antialias", 0) != 0,
    };
    if p.antialias && p.mode == Mode::Nearest {
        return Err(ctx.unsupported("antialias with nearest mode"));
    }
    Ok(p)
}

/// The ROI of axis `k` of `axes` (whole input when absent).
fn roi_of(roi: &[f64], k: usize, naxes: usize) -> (f64, f64) {
    if roi.is_empty() {
        (0.0, 1.0)
    } else {
        (roi[k], roi[naxes + k])
    }
}

fn specs_from_scales(shape: &[usize], scales: &[f64], axes: &[usize], roi: &[f64]) -> Result<Vec<AxisSpec>> {
    if scales.len() != axes.len() {
        return Err(Error::Shape(format!("{} scales for {} axes", scales.len(), axes.len())));
    }
    let mut specs: Vec<AxisSpec> =
        shape.iter().map(|&d| AxisSpec { input: d, output: d, scale: 1.0, roi: (0.0, 1.0) }).collect();
    for (k, &a) in axes.iter().enumerate() {
        let s = scales[k];
        if !s.is_finite() || s <= 0.0 {
            return Err(Error::Shape(format!("resize scale {s} must be positive")));
        }
        specs[a] = AxisSpec {
            input: shape[a],
            output: (s * shape[a] as f64).floor() as usize,
            scale: s,
            roi: roi_of(roi, k, axes.len()),
        };
    }
    Ok(specs)
}

fn specs_from_sizes(
    ctx: &OpCtx,
    shape: &[usize],
    sizes: &[i64],
    axes: &[usize],
    roi: &[f64],
    policy: &str,
) -> Result<Vec<AxisSpec>> {
    if sizes.len() != axes.len() {
        return Err(Error::Shape(format!("{} sizes for {} axes", sizes.len(), axes.len())));
    }
    let sizes = super::shape::dims_from(sizes, "Resize sizes")?;
    let mut specs: Vec<AxisSpec> =
        shape.iter().map(|&d| AxisSpec { input: d, output: d, scale: 1.0, roi: (0.0, 1.0) }).collect();
    let ratios: Vec<f64> = axes.iter().zip(&sizes).map(|(&a, &s)| s as f64 / shape[a] as f64).collect();
    let common = match policy {
        "stretch" => None,
        "not_larger" => ratios.iter().copied().reduce(f64::min),
        "not_smaller" => ratios.iter().copied().reduce(f64::max),
        p => return Err(ctx.unsupported(format!("keep_aspect_ratio_policy {p}"))),
    };
    for (k, &a) in axes.iter().enumerate() {
        let (scale, output) = match common {
            None => (ratios[k], sizes[k]),
            Some(c) => (c, (c * shape[a] as f64 + 0.5) as usize),
        };
        specs[a] = AxisSpec { input: shape[a], output, scale, roi: roi_of(roi, k, axes.len()) };
    }
    Ok(specs)
}

fn run(x: &Tensor, p: &Params, specs: &[AxisSpec]) -> Result<Tensor> {
    if specs.iter().all(|s| s.is_identity()) {
        return Ok(x.clone());
    }
    match p.mode {
        Mode::Nearest => nearest(x, p, specs),
        _ => interpolate(x, p, specs),
    }
}

// ---------------------------------------------------------------------------------------------
// Nearest
// ---------------------------------------------------------------------------------------------

fn nearest_index(x: f64, mode: Nearest, downsample: bool) -> i64 {
    let f = x.floor();
    if x == f {
        return f as i64;
    }
    let r = x - f;
    let up = match mode {
        Nearest::RoundPreferFloor => r > 0.5,
        Nearest::RoundPreferCeil => r >= 0.5,
        Nearest::Floor => false,
        Nearest::Ceil => true,
        Nearest::Legacy => downsample,
    };
    f as i64 + up as i64
}

fn nearest(x: &Tensor, p: &Params, specs: &[AxisSpec]) -> Result<Tensor> {
    let mut needs_fill = false;
    let maps: Vec<Vec<isize>> = specs
        .iter()
        .map(|s| {
            if s.is_identity() {
                return (0..s.input as isize).collect();
            }
            (0..s.output)
                .map(|y| {
                    let (c, outside) = s.source(y, p.coord);
                    if outside || s.input == 0 {
                        needs_fill = true;
                        return -1;
                    }
                    nearest_index(c, p.nearest, s.scale < 1.0).clamp(0, s.input as i64 - 1) as isize
                })
                .collect()
        })
        .collect();
    let fill = if needs_fill { Some(scalar_from_f64(x.dtype(), p.extrapolation)?) } else { None };
    gather_maps(x, &maps, fill.as_ref())
}

// ---------------------------------------------------------------------------------------------
// Linear and cubic
// ---------------------------------------------------------------------------------------------

/// Per output index: `taps` (source index, weight) pairs, or "extrapolated".
struct Weights {
    output: usize,
    taps: usize,
    idx: Vec<usize>,
    w: Vec<f64>,
    outside: Vec<bool>,
}

fn cubic_kernel(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

fn weights(s: &AxisSpec, p: &Params) -> Weights {
    let (radius, kernel): (f64, &dyn Fn(f64) -> f64) = match p.mode {
        Mode::Cubic => (2.0, &|x| cubic_kernel(x, p.cubic_a)),
        _ => (1.0, &|x: f64| (1.0 - x.abs()).max(0.0)),
    };
    // Antialiasing widens the kernel by 1/scale when downsampling.
    let ks = if p.antialias { s.scale.min(1.0) } else { 1.0 };
    let start = (-radius / ks).floor() as i64 + 1;
    let taps = (2 - 2 * start) as usize;
    let mut wt = Weights {
        output: s.output,
        taps,
        idx: Vec::with_capacity(s.output * taps),
        w: Vec::with_capacity(s.output * taps),
        outside: Vec::with_capacity(s.output),
    };
    let last = s.input as i64 - 1;
    for y in 0..s.output {
        let (c, outside) = s.source(y, p.coord);
        wt.outside.push(outside);
        // The left neighbour is strictly left of c, so the ratio lies in (0, 1].
        let base = c.ceil() as i64 - 1;
        let ratio = c - base as f64;
        let row = wt.w.len();
        for j in start..start + taps as i64 {
            let i = base + j;
            let mut w = kernel((j as f64 - ratio) * ks);
            if p.exclude_outside && (i < 0 || i > last) {
                w = 0.0;
            }
            wt.w.push(w);
            wt.idx.push(i.clamp(0, last.max(0)) as usize);
        }
        let sum: f64 = wt.w[row..].iter().sum();
        if (p.antialias || p.exclude_outside) && sum != 0.0 {
            wt.w[row..].iter_mut().for_each(|w| *w /= sum);
        }
    }
    wt
}

/// The float type passes accumulate in.
trait Acc: Copy + Default + Send + Sync + Add<Output = Self> + Mul<Output = Self> + 'static {
    fn of(v: f64) -> Self;
    fn get(self) -> f64;
}
impl Acc for f32 {
    fn of(v: f64) -> f32 {
        v as f32
    }
    fn get(self) -> f64 {
        self as f64
    }
}
impl Acc for f64 {
    fn of(v: f64) -> f64 {
        v
    }
    fn get(self) -> f64 {
        self
    }
}

/// Where one pass reads from and writes to, with the conversions at either end.
struct PassIo<'a, S, D, L, W> {
    src: &'a [S],
    load: L,
    dst: &'a mut [D],
    store: W,
}

/// Resize the middle axis of `src` viewed as [outer, input, inner] into `dst`.
fn pass<S, D, F, L, W>(io: PassIo<S, D, L, W>, outer: usize, input: usize, inner: usize, wt: &Weights, extrap: F)
where
    S: Copy + Sync,
    D: Send,
    F: Acc,
    L: Fn(S) -> F + Sync,
    W: Fn(F) -> D + Sync,
{
    let PassIo { src, load, dst, store } = io;
    if dst.is_empty() {
        return;
    }
    let par = dst.len() >= PAR_MIN;
    let n = wt.taps;
    let w: Vec<F> = wt.w.iter().map(|&v| F::of(v)).collect();
    if inner == 1 {
        // Last axis: each output is a short dot product over neighbouring inputs.
        let per = if par { outer.div_ceil(crate::cpu::par::threads() * 4) } else { outer };
        for_chunks(dst, per * wt.output, par, |ci, chunk| {
            for (k, drow) in chunk.chunks_mut(wt.output).enumerate() {
                let o = ci * per + k;
                let row = &src[o * input..(o + 1) * input];
                for (y, d) in drow.iter_mut().enumerate() {
                    let (ws, is) = (&w[y * n..(y + 1) * n], &wt.idx[y * n..(y + 1) * n]);
                    *d = store(if wt.outside[y] {
                        extrap
                    } else {
                        ws.iter().zip(is).fold(F::default(), |acc, (&w, &i)| acc + w * load(row[i]))
                    });
                }
            }
        });
        return;
    }
    let rows = outer * wt.output;
    let per = if par { rows.div_ceil(crate::cpu::par::threads() * 4) } else { rows };
    for_chunks(dst, per * inner, par, |ci, chunk| {
        let mut acc = vec![F::default(); inner];
        for (k, row) in chunk.chunks_mut(inner).enumerate() {
            let r = ci * per + k;
            let (o, y) = (r / wt.output, r % wt.output);
            acc.fill(if wt.outside[y] { extrap } else { F::default() });
            if !wt.outside[y] {
                for t in 0..n {
                    if wt.w[y * n + t] == 0.0 {
                        continue;
                    }
                    let w = w[y * n + t];
                    let s = &src[(o * input + wt.idx[y * n + t]) * inner..][..inner];
                    for (a, &v) in acc.iter_mut().zip(s) {
                        *a = *a + w * load(v);
                    }
                }
            }
            for (d, &a) in row.iter_mut().zip(&acc) {
                *d = store(a);
            }
        }
    });
}

fn interpolate(x: &Tensor, p: &Params, specs: &[AxisSpec]) -> Result<Tensor> {
    let dt = x.dtype();
    if specs.iter().any(|s| s.input == 0 && s.output > 0) {
        return Err(Error::Shape("cannot interpolate from an empty axis".into()));
    }
    crate::with_numeric!(dt, T, {
        if dt == DType::F64 {
            interpolate_as::<T, f64>(x, p, specs)
        } else {
            interpolate_as::<T, f32>(x, p, specs)
        }
    })
}

fn interpolate_as<T: Scalar, F: Acc>(x: &Tensor, p: &Params, specs: &[AxisSpec]) -> Result<Tensor> {
    let active: Vec<usize> = (0..specs.len()).filter(|&a| !specs[a].is_identity()).collect();
    let final_shape: Vec<usize> =
        specs.iter().map(|s| if s.is_identity() { s.input } else { s.output }).collect();
    let mut out = Tensor::zeros(x.dtype(), &final_shape);
    let is_int = x.dtype().is_int();
    let load_t = |v: T| F::of(v.to_f64());
    let store_t = |v: F| {
        let v = v.get();
        T::from_f64(if is_int { v.round_ties_even() } else { v })
    };
    let extrap = F::of(p.extrapolation);
    let src = x.view::<T>()?;
    let mut shape: Vec<usize> = x.shape().to_vec();
    let mut data: Vec<F> = Vec::new();
    for (k, &a) in active.iter().enumerate() {
        let s = &specs[a];
        let wt = weights(s, p);
        let outer: usize = shape[..a].iter().product();
        let inner: usize = shape[a + 1..].iter().product();
        shape[a] = s.output;
        let (first, last) = (k == 0, k + 1 == active.len());
        if last {
            let dst = out.view_mut::<T>()?;
            if first {
                pass(PassIo { src, load: load_t, dst, store: store_t }, outer, s.input, inner, &wt, extrap);
            } else {
                pass(PassIo { src: &data, load: |v: F| v, dst, store: store_t }, outer, s.input, inner, &wt, extrap);
            }
        } else {
            let mut next = vec![F::default(); numel_of(&shape)];
            if first {
                pass(PassIo { src, load: load_t, dst: &mut next, store: |v: F| v }, outer, s.input, inner, &wt, extrap);
            } else {
                pass(PassIo { src: &data, load: |v: F| v, dst: &mut next, store: |v: F| v }, outer, s.input, inner, &wt, extrap);
            }
            data = next;
        }
    }
    Ok(out)
}

fn numel_of(shape: &[usize]) -> usize {
    shape.iter().product()
}

// ---------------------------------------------------------------------------------------------
// GridSample, AffineGrid
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum GridPad {
    Zeros,
    Border,
    Reflection,
}

/// Fold `x` back into `[lo, hi]` by mirroring at the borders (repeatedly).
fn reflect_into(x: f32, lo: f32, hi: f32) -> f32 {
    let range = hi - lo;
    if range <= 0.0 {
        return lo;
    }
    let fold = |d: f32, near: f32, far: f32, dir: f32| {
        let n = (d / range).trunc();
        let r = d - n * range;
        if n as i64 % 2 == 0 { near + dir * r } else { far - dir * r }
    };
    if x < lo {
        fold(lo - x, lo, hi, 1.0)
    } else if x > hi {
        fold(x - hi, hi, lo, -1.0)
    } else {
        x
    }
}

/// One sampled axis of GridSample: its size and the valid coordinate range.
struct GridAxis {
    size: usize,
    lo: f32,
    hi: f32,
}

impl GridAxis {
    /// The source index sample `i` reads under `pad`, or None for an implicit zero.
    fn tap(&self, i: i64, pad: GridPad) -> Option<usize> {
        let last = self.size as i64 - 1;
        match pad {
            GridPad::Zeros => (0..=last).contains(&i).then_some(i as usize),
            GridPad::Border => Some(i.clamp(0, last) as usize),
            GridPad::Reflection => {
                Some((reflect_into(i as f32, self.lo, self.hi) as i64).clamp(0, last) as usize)
            }
        }
    }
}

fn grid_sample(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let grid = ctx.input(inputs, 1)?;
    let k = x.rank().saturating_sub(2);
    if k == 0 || grid.rank() != k + 2 || grid.shape()[k + 1] != k || grid.shape()[0] != x.shape()[0] {
        return Err(Error::Shape(format!("GridSample: input {:?}, grid {:?}", x.shape(), grid.shape())));
    }
    let mode = match ctx.attr_s("mode", if ctx.opset() < 20 { "bilinear" } else { "linear" }).as_str() {
        "bilinear" | "linear" => Mode::Linear,
        "bicubic" | "cubic" => Mode::Cubic,
        "nearest" => Mode::Nearest,
        m => return Err(ctx.unsupported(format!("mode {m}"))),
    };
    let pad = match ctx.attr_s("padding_mode", "zeros").as_str() {
        "zeros" => GridPad::Zeros,
        "border" => GridPad::Border,
        "reflection" => GridPad::Reflection,
        m => return Err(ctx.unsupported(format!("padding_mode {m}"))),
    };
    let align = ctx.attr_i("align_corners", 0) != 0;
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let dims = &x.shape()[2..];
    let axes: Vec<GridAxis> = dims
        .iter()
        .map(|&d| {
            let (lo, hi) = if align { (0.0, d as f32 - 1.0) } else { (-0.5, d as f32 - 0.5) };
            GridAxis { size: d, lo, hi }
        })
        .collect();
    let plane: usize = dims.iter().product();
    let opts: usize = grid.shape()[1..=k].iter().product();
    let g = grid.to_f64_vec()?;
    let mut oshape = vec![n, c];
    oshape.extend(&grid.shape()[1..=k]);
    let dt = x.dtype();
    crate::with_float!(dt, T, {
        let src = x.view::<T>()?;
        let mut out = vec![T::default(); n * c * opts];
        let mut taps: Vec<Vec<(Option<usize>, f64)>> = vec![Vec::new(); k];
        let st = super::shape::istrides(dims);
        for b in 0..n {
            for o in 0..opts {
                // Grid coordinates come innermost axis first.
                let coords = &g[(b * opts + o) * k..][..k];
                for d in 0..k {
                    let ax = &axes[d];
                    let v = coords[k - 1 - d] as f32;
                    let size = ax.size as f32;
                    let mut p = if align { (v + 1.0) / 2.0 * (size - 1.0) } else { ((v + 1.0) * size - 1.0) / 2.0 };
                    if mode == Mode::Nearest {
                        p = p.round_ties_even();
                    }
                    if p < ax.lo || p > ax.hi {
                        p = match pad {
                            GridPad::Border => p.clamp(0.0, size - 1.0),
                            GridPad::Reflection => reflect_into(p, ax.lo, ax.hi),
                            GridPad::Zeros => p,
                        };
                    }
                    let t = &mut taps[d];
                    t.clear();
                    match mode {
                        Mode::Nearest => t.push((ax.tap(p as i64, pad), 1.0)),
                        Mode::Linear => {
                            let f = p.floor();
                            let r = (p - f) as f64;
                            t.push((ax.tap(f as i64, pad), 1.0 - r));
                            t.push((ax.tap(f as i64 + 1, pad), r));
                        }
                        Mode::Cubic => {
                            let f = p.floor();
                            let r = (p - f) as f64;
                            for j in -1..=2i64 {
                                t.push((ax.tap(f as i64 + j, pad), cubic_kernel(j as f64 - r, -0.75)));
                            }
                        }
                    }
                }
                for ch in 0..c {
                    let base = (b * c + ch) * plane;
                    out[(b * c + ch) * opts + o] = T::from_f64(sum_taps(src, base, &taps, &st, 0));
                }
            }
        }
        Ok(vec![Tensor::from_slice_as(dt, &oshape, &out)?])
    })
}

/// Σ over every combination of per-axis taps of the weight product times the sample.
fn sum_taps<T: Scalar>(src: &[T], off: usize, taps: &[Vec<(Option<usize>, f64)>], st: &[isize], d: usize) -> f64 {
    if d == taps.len() {
        return src[off].to_f64();
    }
    taps[d]
        .iter()
        .filter(|(i, w)| i.is_some() && *w != 0.0)
        .map(|&(i, w)| w * sum_taps(src, off + i.unwrap_or(0) * st[d] as usize, taps, st, d + 1))
        .sum()
}

fn affine_grid(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let theta = ctx.input(inputs, 0)?;
    let size = super::shape::dims_from(&ctx.input(inputs, 1)?.to_i64_vec()?, "AffineGrid size")?;
    let align = ctx.attr_i("align_corners", 0) != 0;
    let k = size.len().saturating_sub(2);
    let n = size.first().copied().unwrap_or(0);
    if !(k == 2 || k == 3) || theta.shape() != [n, k, k + 1] {
        return Err(Error::Shape(format!("AffineGrid: theta {:?} with size {size:?}", theta.shape())));
    }
    let spatial = &size[2..];
    // Normalised base coordinate of index i along an axis of length s.
    let base = |i: usize, s: usize| -> f64 {
        if align {
            if s <= 1 { -1.0 } else { -1.0 + 2.0 * i as f64 / (s - 1) as f64 }
        } else {
            -1.0 + (2 * i + 1) as f64 / s as f64
        }
    };
    let th = theta.to_f64_vec()?;
    let pts: usize = spatial.iter().product();
    let mut out = Vec::with_capacity(n * pts * k);
    for b in 0..n {
        let m = &th[b * k * (k + 1)..][..k * (k + 1)];
        for p in 0..pts {
            // Homogeneous point, innermost axis (x) first.
            let mut rem = p;
            let mut h = vec![1.0; k + 1];
            for d in (0..k).rev() {
                h[k - 1 - d] = base(rem % spatial[d], spatial[d]);
                rem /= spatial[d];
            }
            for r in 0..k {
                out.push((0..=k).map(|j| m[r * (k + 1) + j] * h[j]).sum::<f64>());
            }
        }
    }
    let mut oshape = vec![n];
    oshape.extend(spatial);
    oshape.push(k);
    let dt = theta.dtype();
    crate::with_float!(dt, T, {
        let v: Vec<T> = out.iter().map(|&x| T::from_f64(x)).collect();
        Ok(vec![Tensor::from_slice_as(dt, &oshape, &v)?])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    fn astr(name: &str, v: &str) -> Attr {
        Attr { name: name.into(), kind: AttrKind::String as i32, s: v.as_bytes().to_vec(), ..Default::default() }
    }

    fn run_resize(attrs: Vec<Attr>, x: Tensor, scales: &[f32]) -> Tensor {
        let s = Step { op: "Resize".into(), opset: 13, outputs: vec![0], attrs, ..Default::default() };
        let sc = Tensor::from_vec(&[scales.len()], scales.to_vec()).unwrap();
        resize(&OpCtx::new(&s, None), &[Some(x), None, Some(sc)]).unwrap().remove(0)
    }

    #[test]
    fn nearest_upsample_any_dtype() {
        let x = Tensor::from_vec(&[1, 2], vec![1i64, 2]).unwrap();
        let y = run_resize(vec![astr("mode", "nearest")], x, &[1.0, 2.0]);
        assert_eq!(y.view::<i64>().unwrap(), &[1, 1, 2, 2]);
    }

    #[test]
    fn linear_half_pixel_and_align_corners() {
        let x = Tensor::from_vec(&[2], vec![0f32, 1.]).unwrap();
        let y = run_resize(vec![astr("mode", "linear")], x.clone(), &[2.0]);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 0.25, 0.75, 1.]);
        let y = run_resize(vec![astr("mode", "linear"), astr("coordinate_transformation_mode", "align_corners")], x, &[1.5]);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 0.5, 1.]);
    }

    #[test]
    fn cubic_weights_sum_to_one() {
        let p = Params {
            mode: Mode::Cubic,
            coord: Coord::HalfPixel,
            nearest: Nearest::Floor,
            cubic_a: -0.75,
            exclude_outside: false,
            extrapolation: 0.0,
            antialias: false,
        };
        let s = AxisSpec { input: 5, output: 9, scale: 1.8, roi: (0.0, 1.0) };
        let w = weights(&s, &p);
        for y in 0..9 {
            let sum: f64 = w.w[y * 4..y * 4 + 4].iter().sum();
            assert!((sum - 1.0).abs() < 1e-12);
        }
    }
}
