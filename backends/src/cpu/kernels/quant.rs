//! Linear (de)quantization: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear.
//!
//! Scales and zero points apply per tensor, per axis, or per block along an axis (opset 21). Every
//! element finds its parameter through an (outer, axis, inner) decomposition of the input shape,
//! so the inner loop is contiguous and parameter lookup is a couple of multiplications.

use std::borrow::Cow;

use kiln_runtime::{DType, Error, Result, Tensor};
use rayon::prelude::*;

use super::cast::{f8_decode, f8_encode, F8Format};
use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{norm_axis, Real};

pub fn register(r: &mut Registry) {
    r.add("QuantizeLinear", quantize_linear);
    r.add("DequantizeLinear", dequantize_linear);
    r.add("DynamicQuantizeLinear", dynamic_quantize_linear);
}

const PAR_GRAIN: usize = 1 << 15;

/// How scale / zero-point elements map onto input elements.
#[derive(Clone, Copy, Debug)]
struct Layout {
    n: usize,
    inner: usize,
    mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Tensor,
    Axis,
    /// Blocks of this many elements along the axis share one parameter.
    Block(usize),
}

impl Layout {
    fn new(ctx: &OpCtx, x_shape: &[usize], scale_shape: &[usize]) -> Result<Layout> {
        let rank = x_shape.len();
        let nscale: usize = scale_shape.iter().product();
        let block = ctx.attr_i("block_size", 0);
        if scale_shape.is_empty() || (nscale == 1 && block <= 0) {
            let n: usize = x_shape.iter().product();
            return Ok(Layout { n, inner: 1, mode: Mode::Tensor });
        }
        let axis = norm_axis(ctx.attr_i("axis", 1), rank)?;
        let n = x_shape[axis];
        let inner = x_shape[axis + 1..].iter().product();
        if block > 0 {
            let bs = block as usize;
            let mut want = x_shape.to_vec();
            want[axis] = n.div_ceil(bs);
            if scale_shape != want.as_slice() {
                return Err(Error::Shape(format!(
                    "blocked scale has shape {scale_shape:?}, expected {want:?} for input {x_shape:?}"
                )));
            }
            return Ok(Layout { n, inner, mode: Mode::Block(bs) });
        }
        if scale_shape.len() != 1 || scale_shape[0] != n {
            return Err(Error::Shape(format!(
                "per-axis scale has shape {scale_shape:?}, input {x_shape:?} has {n} along axis {axis}"
            )));
        }
        Ok(Layout { n, inner, mode: Mode::Axis })
    }

    /// Number of elements in a chunk that `for_rows` hands out (one axis row of `inner` elements).
    fn row(&self) -> usize {
        match self.mode {
            Mode::Tensor => self.n.max(1),
            _ => self.inner.max(1),
        }
    }

    /// The parameter index of the first element of row `r` and the step between elements of
    /// the row (0: the whole row shares one parameter).
    #[inline]
    fn param(&self, r: usize) -> (usize, usize) {
        match self.mode {
            Mode::Tensor => (0, 0),
            Mode::Axis => (r % self.n, 0),
            Mode::Block(bs) => {
                let (o, a) = (r / self.n, r % self.n);
                let nb = self.n.div_ceil(bs);
                ((o * nb + a / bs) * self.inner, 1)
            }
        }
    }
}

/// Map every input element to an output element, row by row, with the row's parameter indices.
fn for_rows<I: Sync, O: Send + Copy + Default>(
    x: &[I],
    lay: &Layout,
    f: impl Fn(&[I], &mut [O], usize, usize) + Sync,
) -> Vec<O> {
    let mut out = vec![O::default(); x.len()];
    let row = lay.row();
    if x.is_empty() {
        return out;
    }
    let go = |(r, (xs, os)): (usize, (&[I], &mut [O]))| {
        let (p0, step) = lay.param(r);
        f(xs, os, p0, step);
    };
    if x.len() >= 2 * PAR_GRAIN && crate::cpu::par::threads() > 1 {
        let rows_per = (PAR_GRAIN / row).max(1);
        x.par_chunks(row * rows_per)
            .zip(out.par_chunks_mut(row * rows_per))
            .enumerate()
            .for_each(|(c, (xc, oc))| {
                for (j, pair) in xc.chunks(row).zip(oc.chunks_mut(row)).enumerate() {
                    go((c * rows_per + j, pair));
                }
            });
    } else {
        x.chunks(row).zip(out.chunks_mut(row)).enumerate().for_each(go);
    }
    out
}

/// Float values of any real or int32 tensor, in compute type R.
fn real_of<R: Real>(t: &Tensor) -> Result<Cow<'_, [R]>> {
    match t.dtype() {
        DType::I32 => Ok(Cow::Owned(t.view::<i32>()?.iter().map(|&v| R::from_f64(v as f64)).collect())),
        _ => crate::cpu::util::real_vec::<R>(t),
    }
}

/// The integer range of an integer quantized type.
fn int_range(dt: DType) -> Option<(f64, f64)> {
    Some(match dt {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::U4 => (0.0, 15.0),
        DType::I4 => (-8.0, 7.0),
        DType::U2 => (0.0, 3.0),
        DType::I2 => (-2.0, 1.0),
        DType::I32 => (i32::MIN as f64, i32::MAX as f64),
        _ => return None,
    })
}

/// Integer values of an integer tensor widened to i32 (zero points, dequantize inputs).
fn ints_i32(t: &Tensor) -> Result<Cow<'_, [i32]>> {
    Ok(match t.dtype() {
        DType::I32 => Cow::Borrowed(t.view::<i32>()?),
        DType::U8 | DType::U4 | DType::U2 => Cow::Owned(t.view::<u8>()?.iter().map(|&v| v as i32).collect()),
        DType::I8 | DType::I4 | DType::I2 => Cow::Owned(t.view::<i8>()?.iter().map(|&v| v as i32).collect()),
        DType::U16 => Cow::Owned(t.view::<u16>()?.iter().map(|&v| v as i32).collect()),
        DType::I16 => Cow::Owned(t.view::<i16>()?.iter().map(|&v| v as i32).collect()),
        d => return Err(Error::DType(format!("expected a quantized integer type, got {d}"))),
    })
}

/// Pack quantized integer values (already clamped) into a tensor of `dt`.
fn int_tensor(dt: DType, shape: &[usize], v: &[i32]) -> Result<Tensor> {
    match dt {
        DType::U8 | DType::U4 | DType::U2 => Tensor::from_slice_as(dt, shape, &v.iter().map(|&x| x as u8).collect::<Vec<_>>()),
        DType::I8 | DType::I4 | DType::I2 => Tensor::from_slice_as(dt, shape, &v.iter().map(|&x| x as i8).collect::<Vec<_>>()),
        DType::U16 => Tensor::from_vec(shape, v.iter().map(|&x| x as u16).collect()),
        DType::I16 => Tensor::from_vec(shape, v.iter().map(|&x| x as i16).collect()),
        DType::I32 => Tensor::from_vec(shape, v.to_vec()),
        d => Err(Error::DType(format!("{d} is not a quantized integer type"))),
    }
}

// ---------------------------------------------------------------------------------------------
// QuantizeLinear
// ---------------------------------------------------------------------------------------------

fn quantize_linear(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let scale = ctx.input(inputs, 1)?;
    let zp = ctx.opt_input(inputs, 2);
    let out_dt = match zp {
        Some(z) => z.dtype(),
        None => match ctx.attr_i("output_dtype", 0) {
            0 => DType::U8,
            c => DType::from_onnx(c as i32)
                .ok_or_else(|| ctx.unsupported(format!("output_dtype {c}")))?,
        },
    };
    let lay = Layout::new(ctx, x.shape(), scale.shape())?;
    if let Some(z) = zp {
        if z.shape() != scale.shape() && z.len() != scale.len() {
            return Err(Error::Shape(format!(
                "zero point shape {:?} differs from scale shape {:?}",
                z.shape(),
                scale.shape()
            )));
        }
    }
    let saturate = ctx.attr_i("saturate", 1) != 0;
    if x.dtype() == DType::F64 || scale.dtype() == DType::F64 || x.dtype() == DType::I32 {
        quantize_typed::<f64>(x, scale, zp, out_dt, &lay, saturate)
    } else {
        quantize_typed::<f32>(x, scale, zp, out_dt, &lay, saturate)
    }
    .map(|t| vec![t])
}

fn quantize_typed<R: Real>(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    out_dt: DType,
    lay: &Layout,
    saturate: bool,
) -> Result<Tensor> {
    let xv = real_of::<R>(x)?;
    let sv = real_of::<R>(scale)?;
    let shape = x.shape();
    if let Some((lo, hi)) = int_range(out_dt) {
        let zv: Cow<[i32]> = match zp {
            Some(z) => ints_i32(z)?,
            None => Cow::Owned(vec![0; sv.len()]),
        };
        let q = for_rows(&xv, lay, |xs, os: &mut [i32], p0, step| {
            for (i, (o, &v)) in os.iter_mut().zip(xs).enumerate() {
                let p = p0 + i * step;
                let r = (v / sv[p]).to_f64().round_ties_even() + zv[p] as f64;
                // NaN clamps to the low end, like a saturating float->int conversion would give 0.
                *o = if r.is_nan() { 0 } else { r.clamp(lo, hi) as i32 };
            }
        });
        return int_tensor(out_dt, shape, &q);
    }
    let fmt = F8Format::of(out_dt).ok_or_else(|| Error::DType(format!("cannot quantize to {out_dt}")))?;
    // Float4's zero point is added before encoding; float8 zero points must be zero.
    let zv: Option<Vec<f32>> = match (out_dt, zp) {
        (DType::F4E2M1, Some(z)) => Some(z.view::<u8>()?.iter().map(|&c| f8_decode(c, &fmt)).collect()),
        _ => None,
    };
    let sat = saturate || out_dt == DType::F4E2M1;
    let q = for_rows(&xv, lay, |xs, os: &mut [u8], p0, step| {
        for (i, (o, &v)) in os.iter_mut().zip(xs).enumerate() {
            let p = p0 + i * step;
            // The quotient is rounded to the compute type first, as the reference does.
            let mut r = (v / sv[p]).to_f64();
            if let Some(z) = &zv {
                r = (r as f32 + z[p]) as f64;
            }
            *o = f8_encode(r, &fmt, sat);
        }
    });
    Tensor::from_slice_as(out_dt, shape, &q)
}

// ---------------------------------------------------------------------------------------------
// DequantizeLinear
// ---------------------------------------------------------------------------------------------

fn dequantize_linear(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let scale = ctx.input(inputs, 1)?;
    let zp = ctx.opt_input(inputs, 2);
    let out_dt = match ctx.attr_i("output_dtype", 0) {
        0 => scale.dtype(),
        c => DType::from_onnx(c as i32).ok_or_else(|| ctx.unsupported(format!("output_dtype {c}")))?,
    };
    if !matches!(out_dt, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
        return Err(Error::DType(format!("DequantizeLinear cannot produce {out_dt}")));
    }
    let lay = Layout::new(ctx, x.shape(), scale.shape())?;
    let t = if scale.dtype() == DType::F64 || out_dt == DType::F64 {
        dequantize_typed::<f64>(x, scale, zp, out_dt, &lay)?
    } else {
        dequantize_typed::<f32>(x, scale, zp, out_dt, &lay)?
    };
    Ok(vec![t])
}

fn dequantize_typed<R: Real>(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    out_dt: DType,
    lay: &Layout,
) -> Result<Tensor> {
    let sv = crate::cpu::util::real_vec::<R>(scale)?;
    let y: Vec<R> = if let Some(fmt) = F8Format::of(x.dtype()) {
        // Float8 zero points are zero by definition; float4's is subtracted as a float.
        let zv: Option<Vec<f32>> = match (x.dtype(), zp) {
            (DType::F4E2M1, Some(z)) => Some(z.view::<u8>()?.iter().map(|&c| f8_decode(c, &fmt)).collect()),
            _ => None,
        };
        for_rows(x.view::<u8>()?, lay, |xs, os: &mut [R], p0, step| {
            for (i, (o, &c)) in os.iter_mut().zip(xs).enumerate() {
                let p = p0 + i * step;
                let mut v = f8_decode(c, &fmt);
                if let Some(z) = &zv {
                    v -= z[p];
                }
                *o = R::from_f64(v as f64) * sv[p];
            }
        })
    } else {
        let xv = ints_i32(x)?;
        let zv: Cow<[i32]> = match zp {
            Some(z) => {
                if z.dtype() != x.dtype() {
                    return Err(Error::DType(format!(
                        "zero point is {}, input is {}",
                        z.dtype(),
                        x.dtype()
                    )));
                }
                ints_i32(z)?
            }
            None => Cow::Owned(vec![0; sv.len()]),
        };
        // The difference is formed in f32, as the reference does (exact for every type but int32).
        for_rows(&xv, lay, |xs, os: &mut [R], p0, step| {
            for (i, (o, &v)) in os.iter_mut().zip(xs).enumerate() {
                let p = p0 + i * step;
                let d = v as f32 - zv[p] as f32;
                *o = R::from_f64(d as f64) * sv[p];
            }
        })
    };
    crate::cpu::util::real_tensor(out_dt, x.shape(), y)
}

// ---------------------------------------------------------------------------------------------
// DynamicQuantizeLinear
// ---------------------------------------------------------------------------------------------

fn dynamic_quantize_linear(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let xv = crate::cpu::util::real_vec::<f32>(x)?;
    let (mut lo, mut hi) = (0.0f32, 0.0f32);
    for &v in xv.iter() {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let scale = if hi == lo { 1.0f32 } else { hi - lo } / 255.0;
    let zp = (0.0 - lo / scale).clamp(0.0, 255.0).round_ties_even();
    let q: Vec<u8> = if xv.len() >= 2 * PAR_GRAIN && crate::cpu::par::threads() > 1 {
        xv.par_iter().map(|&v| ((v / scale).round_ties_even() + zp).clamp(0.0, 255.0) as u8).collect()
    } else {
        xv.iter().map(|&v| ((v / scale).round_ties_even() + zp).clamp(0.0, 255.0) as u8).collect()
    };
    let scale_t = crate::cpu::util::real_tensor::<f32>(x.dtype(), &[], vec![scale])?;
    Ok(vec![Tensor::from_vec(x.shape(), q)?, scale_t, Tensor::scalar(zp as u8)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, Step};

    fn run(op: &str, opset: i64, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Vec<Tensor> {
        let s = Step { op: op.into(), opset, attrs, ..Default::default() };
        let k = match crate::cpu::registry().get("", op) {
            Some(crate::cpu::Kernel::Tensor(k)) => k,
            _ => panic!("no kernel"),
        };
        k(&OpCtx::new(&s, None), &inputs).unwrap()
    }

    fn int(name: &str, i: i64) -> Attr {
        Attr { name: name.into(), i, ..Default::default() }
    }

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        let x = Tensor::from_vec(&[6], vec![2.5f32, 3.5, -2.5, 1000.0, -1000.0, 0.4]).unwrap();
        let out = run(
            "QuantizeLinear",
            13,
            vec![],
            vec![Some(x), Some(Tensor::scalar(1.0f32)), Some(Tensor::scalar(10i8))],
        );
        assert_eq!(out[0].view::<i8>().unwrap(), &[12, 14, 8, 127, -128, 10]);
    }

    #[test]
    fn quantize_per_axis_and_blocked() {
        let x = Tensor::from_vec(&[2, 4], vec![1f32, 2., 3., 4., 5., 6., 7., 8.]).unwrap();
        let s = Tensor::from_vec(&[2], vec![1f32, 2.]).unwrap();
        let out = run("QuantizeLinear", 13, vec![int("axis", 0)], vec![Some(x.clone()), Some(s), None]);
        assert_eq!(out[0].dtype(), DType::U8);
        assert_eq!(out[0].view::<u8>().unwrap(), &[1, 2, 3, 4, 2, 3, 4, 4]);
        // Blocks of 2 along axis 1: scales [[1, 2], [4, 8]].
        let s = Tensor::from_vec(&[2, 2], vec![1f32, 2., 4., 8.]).unwrap();
        let out = run(
            "QuantizeLinear",
            21,
            vec![int("axis", 1), int("block_size", 2)],
            vec![Some(x), Some(s), None],
        );
        assert_eq!(out[0].view::<u8>().unwrap(), &[1, 2, 2, 2, 1, 2, 1, 1]);
    }

    #[test]
    fn dequantize_int4_and_float8() {
        let x = Tensor::from_slice_as(DType::I4, &[3], &[-8i8, 0, 7]).unwrap();
        let zp = Tensor::from_slice_as(DType::I4, &[], &[1i8]).unwrap();
        let out = run("DequantizeLinear", 21, vec![], vec![Some(x), Some(Tensor::scalar(0.5f32)), Some(zp)]);
        assert_eq!(out[0].view::<f32>().unwrap(), &[-4.5, -0.5, 3.0]);
        // E4M3FN 0x38 = 1.0, 0xC0 = -2.0.
        let x = Tensor::from_slice_as(DType::F8E4M3FN, &[2], &[0x38u8, 0xC0]).unwrap();
        let out = run("DequantizeLinear", 19, vec![], vec![Some(x), Some(Tensor::scalar(3.0f32))]);
        assert_eq!(out[0].view::<f32>().unwrap(), &[3.0, -6.0]);
    }

    #[test]
    fn two_bit_ranges() {
        let x = Tensor::from_vec(&[5], vec![2.5f32, 4.8, -4.0, -3.0, 0.4]).unwrap();
        let zp = Tensor::from_slice_as(DType::I2, &[], &[0i8]).unwrap();
        let out = run("QuantizeLinear", 21, vec![], vec![Some(x.clone()), Some(Tensor::scalar(2.0f32)), Some(zp)]);
        assert_eq!((out[0].dtype(), out[0].view::<i8>().unwrap()), (DType::I2, &[1i8, 1, -2, -2, 0][..]));
        let zp = Tensor::from_slice_as(DType::U2, &[], &[1u8]).unwrap();
        let out = run("QuantizeLinear", 21, vec![], vec![Some(x), Some(Tensor::scalar(2.0f32)), Some(zp)]);
        assert_eq!((out[0].dtype(), out[0].view::<u8>().unwrap()), (DType::U2, &[2u8, 3, 0, 0, 1][..]));

        let x = Tensor::from_slice_as(DType::I2, &[4], &[0i8, 1, -1, -2]).unwrap();
        let zp = Tensor::from_slice_as(DType::I2, &[], &[1i8]).unwrap();
        let out = run("DequantizeLinear", 21, vec![], vec![Some(x), Some(Tensor::scalar(2.0f32)), Some(zp)]);
        assert_eq!(out[0].view::<f32>().unwrap(), &[-2.0, 0.0, -4.0, -6.0]);
        let x = Tensor::from_slice_as(DType::U2, &[4], &[0u8, 1, 2, 3]).unwrap();
        let zp = Tensor::from_slice_as(DType::U2, &[], &[3u8]).unwrap();
        let out = run("DequantizeLinear", 21, vec![], vec![Some(x), Some(Tensor::scalar(0.5f32)), Some(zp)]);
        assert_eq!(out[0].view::<f32>().unwrap(), &[-1.5, -1.0, -0.5, 0.0]);
    }

    #[test]
    fn dynamic_quantize() {
        let x = Tensor::from_vec(&[3], vec![0f32, 2.55, -2.55]).unwrap();
        let out = run("DynamicQuantizeLinear", 11, vec![], vec![Some(x)]);
        let scale = out[1].item::<f32>().unwrap();
        assert!((scale - 0.02).abs() < 1e-7);
        assert_eq!(out[2].item::<u8>().unwrap(), 128);
        assert_eq!(out[0].view::<u8>().unwrap(), &[128, 255, 0]);
    }
}
