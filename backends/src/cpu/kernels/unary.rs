//! Elementwise unary ops: math (Abs, Neg, Sign, Sqrt, Exp, Log, trig…), activations (Relu,
//! Sigmoid, Gelu, Elu, Selu, Mish, HardSwish…), Clip, Shrink, IsNaN/IsInf, Not, BitwiseNot,
//! Identity. Float ops run natively on f32/f64 and through f32 for f16/bf16.

use half::{bf16, f16};
use kiln_runtime::{DType, Error, Result, Tensor, Value};

use super::cast::{cast_tensor, RoundMode};
use super::elementwise::{par_map, Arith};
use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;

/// Special functions std lacks, for the compute types.
trait Special: Copy {
    fn erf_(self) -> Self;
}

impl Special for f32 {
    fn erf_(self) -> f32 {
        libm::erff(self)
    }
}

impl Special for f64 {
    fn erf_(self) -> f64 {
        libm::erf(self)
    }
}

/// A new tensor of `x`'s dtype and shape with `|$v: $R| $body` applied to every element; `$R` is
/// bound to the compute type (f32 or f64).
macro_rules! float_map {
    ($x:expr, $R:ident, |$v:ident| $body:expr) => {{
        let x: &Tensor = $x;
        let dt = x.dtype();
        let mut out = Tensor::zeros(dt, x.shape());
        match dt {
            DType::F32 => {
                type $R = f32;
                par_map(x.view::<f32>()?, out.view_mut::<f32>()?, |$v: $R| $body)
            }
            DType::F64 => {
                type $R = f64;
                par_map(x.view::<f64>()?, out.view_mut::<f64>()?, |$v: $R| $body)
            }
            DType::F16 => {
                type $R = f32;
                par_map(x.view::<f16>()?, out.view_mut::<f16>()?, |h: f16| {
                    let $v: $R = h.to_f32();
                    f16::from_f32($body)
                })
            }
            DType::BF16 => {
                type $R = f32;
                par_map(x.view::<bf16>()?, out.view_mut::<bf16>()?, |h: bf16| {
                    let $v: $R = h.to_f32();
                    bf16::from_f32($body)
                })
            }
            d => return Err(Error::DType(format!("unsupported dtype {d} (expected a float type)"))),
        }
        out
    }};
}

/// A float unary kernel: `$setup` reads attributes (with `$ctx`), then `$body` maps each `$v`.
macro_rules! float_kernel {
    ($name:ident, $R:ident, |$ctx:ident, $v:ident| { $($setup:tt)* } => $body:expr) => {
        fn $name($ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
            let x = $ctx.input(inputs, 0)?;
            $($setup)*
            Ok(vec![float_map!(x, $R, |$v| $body)])
        }
    };
}

float_kernel!(reciprocal, R, |_c, v| {} => 1.0 / v);
float_kernel!(floor, R, |_c, v| {} => v.floor());
float_kernel!(ceil, R, |_c, v| {} => v.ceil());
float_kernel!(round, R, |_c, v| {} => v.round_ties_even());
float_kernel!(sqrt, R, |_c, v| {} => v.sqrt());
float_kernel!(exp, R, |_c, v| {} => v.exp());
float_kernel!(log, R, |_c, v| {} => v.ln());
float_kernel!(erf, R, |_c, v| {} => v.erf_());
float_kernel!(sin, R, |_c, v| {} => v.sin());
float_kernel!(cos, R, |_c, v| {} => v.cos());
float_kernel!(tan, R, |_c, v| {} => v.tan());
float_kernel!(asin, R, |_c, v| {} => v.asin());
float_kernel!(acos, R, |_c, v| {} => v.acos());
float_kernel!(atan, R, |_c, v| {} => v.atan());
float_kernel!(sinh, R, |_c, v| {} => v.sinh());
float_kernel!(cosh, R, |_c, v| {} => v.cosh());
float_kernel!(asinh, R, |_c, v| {} => v.asinh());
float_kernel!(acosh, R, |_c, v| {} => v.acosh());
float_kernel!(atanh, R, |_c, v| {} => v.atanh());
float_kernel!(tanh, R, |_c, v| {} => v.tanh());
float_kernel!(sigmoid, R, |_c, v| {} => sigmoid_of(v));
float_kernel!(softsign, R, |_c, v| {} => v / (1.0 + v.abs()));
float_kernel!(softplus, R, |_c, v| {} => softplus_of(v));
float_kernel!(mish, R, |_c, v| {} => v * softplus_of(v).tanh());
float_kernel!(hardswish, R, |_c, v| {} => v * (v / 6.0 + 0.5).clamp(0.0, 1.0));
float_kernel!(leaky_relu, R, |c, v| { let alpha = c.attr_f("alpha", 0.01); }
    => if v < 0.0 { v * alpha as R } else { v });
float_kernel!(elu, R, |c, v| { let alpha = c.attr_f("alpha", 1.0); }
    => if v > 0.0 { v } else { alpha as R * v.exp_m1() });
float_kernel!(selu, R, |c, v| {
        let alpha = c.attr_f("alpha", 1.673_263_2);
        let gamma = c.attr_f("gamma", 1.050_701);
    } => gamma as R * if v > 0.0 { v } else { alpha as R * v.exp_m1() });
float_kernel!(celu, R, |c, v| { let alpha = c.attr_f("alpha", 1.0); }
    => v.max(0.0) + (alpha as R * (v / alpha as R).exp_m1()).min(0.0));
float_kernel!(thresholded_relu, R, |c, v| { let alpha = c.attr_f("alpha", 1.0); }
    => if v > alpha as R { v } else { 0.0 });
float_kernel!(hard_sigmoid, R, |c, v| {
        let alpha = c.attr_f("alpha", 0.2);
        let beta = c.attr_f("beta", 0.5);
    } => (alpha as R * v + beta as R).clamp(0.0, 1.0));
float_kernel!(swish, R, |c, v| { let alpha = c.attr_f("alpha", 1.0); }
    => v * sigmoid_of(alpha as R * v));

/// 1/(1+e^-x) without overflow for large |x|.
#[inline(always)]
fn sigmoid_of<R: num::Real>(x: R) -> R {
    if x >= R::ZERO {
        R::ONE / (R::ONE + (-x).exp())
    } else {
        let e = x.exp();
        e / (R::ONE + e)
    }
}

/// ln(1+e^x) without overflow for large x.
#[inline(always)]
fn softplus_of<R: num::Real>(x: R) -> R {
    if x > R::ZERO {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// The few float operations the generic helpers need, for f32 and f64.
mod num {
    use std::ops::{Add, Div, Neg};

    pub trait Real: Copy + PartialOrd + Add<Output = Self> + Div<Output = Self> + Neg<Output = Self> {
        const ZERO: Self;
        const ONE: Self;
        fn exp(self) -> Self;
        fn ln_1p(self) -> Self;
    }

    macro_rules! real {
        ($($t:ty),*) => {$(
            impl Real for $t {
                const ZERO: Self = 0.0;
                const ONE: Self = 1.0;
                #[inline(always)] fn exp(self) -> Self { <$t>::exp(self) }
                #[inline(always)] fn ln_1p(self) -> Self { <$t>::ln_1p(self) }
            }
        )*};
    }
    real!(f32, f64);
}

fn gelu(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let out = match ctx.attr_s("approximate", "none").as_str() {
        "none" => float_map!(x, R, |v| {
            0.5 * v * (1.0 + (v * std::f64::consts::FRAC_1_SQRT_2 as R).erf_())
        }),
        "tanh" => float_map!(x, R, |v| {
            let k = (2.0 / std::f64::consts::PI).sqrt() as R;
            0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())
        }),
        a => return Err(ctx.unsupported(format!("approximate='{a}'"))),
    };
    Ok(vec![out])
}

// ---------------------------------------------------------------------------------------------
// Ops that also take integers.

/// Element types with an order and a zero (for the integer-capable ops).
trait Ordered: Arith + PartialOrd {
    const ZERO: Self;
    const ONE: Self;
}

macro_rules! ordered {
    ($zero:expr, $one:expr => $($t:ty),*) => {$(
        impl Ordered for $t {
            const ZERO: Self = $zero;
            const ONE: Self = $one;
        }
    )*};
}
ordered!(0, 1 => i8, i16, i32, i64, u8, u16, u32, u64);
ordered!(0.0, 1.0 => f32, f64);
ordered!(f16::ZERO, f16::ONE => f16);
ordered!(bf16::ZERO, bf16::ONE => bf16);

/// A new tensor of `x`'s dtype with `f` applied to every element.
fn map_same<T: Ordered>(x: &Tensor, f: impl Fn(T) -> T + Sync) -> Result<Tensor> {
    let mut out = Tensor::zeros(x.dtype(), x.shape());
    par_map(x.view::<T>()?, out.view_mut::<T>()?, f);
    Ok(out)
}

fn abs(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    if x.dtype().is_float() {
        return Ok(vec![float_map!(x, R, |v| v.abs())]);
    }
    let out = crate::with_int!(x.dtype(), T, {
        map_same::<T>(x, |v| if v < T::ZERO { T::ZERO.sub(v) } else { v })?
    });
    Ok(vec![out])
}

fn neg(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    if x.dtype().is_float() {
        return Ok(vec![float_map!(x, R, |v| -v)]);
    }
    let out = crate::with_int!(x.dtype(), T, { map_same::<T>(x, |v| T::ZERO.sub(v))? });
    Ok(vec![out])
}

fn sign(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let out = crate::with_numeric!(x.dtype(), T, {
        map_same::<T>(x, |v| {
            if v > T::ZERO {
                T::ONE
            } else if v < T::ZERO {
                T::ZERO.sub(T::ONE)
            } else {
                v // zero, or NaN
            }
        })?
    });
    Ok(vec![out])
}

fn relu(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let out = crate::with_numeric!(x.dtype(), T, {
        map_same::<T>(x, |v| if v < T::ZERO { T::ZERO } else { v })?
    });
    Ok(vec![out])
}

/// The single element of an optional bound input, as `T`.
fn bound<T: Ordered>(t: Option<&Tensor>, dt: DType) -> Result<Option<T>> {
    match t {
        None => Ok(None),
        Some(t) if t.dtype() != dt => {
            Err(Error::DType(format!("Clip bound is {}, input is {dt}", t.dtype())))
        }
        Some(t) if t.is_empty() => Ok(None),
        Some(t) => Ok(Some(t.view::<T>()?[0])),
    }
}

fn clip(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let dt = x.dtype();
    let out = crate::with_numeric!(dt, T, {
        let (lo, hi): (Option<T>, Option<T>) = if ctx.opset() < 11 {
            let f = |name: &str| ctx.attr_f_opt(name).map(|v| T::from_f64(v as f64));
            (f("min"), f("max"))
        } else {
            (bound(ctx.opt_input(inputs, 1), dt)?, bound(ctx.opt_input(inputs, 2), dt)?)
        };
        // numpy's clip: max(x, lo) first, then min(., hi), so hi wins when lo > hi; NaN stays.
        map_same::<T>(x, |v| {
            let v = match lo {
                Some(lo) if v < lo => lo,
                _ => v,
            };
            match hi {
                Some(hi) if v > hi => hi,
                _ => v,
            }
        })?
    });
    Ok(vec![out])
}

fn shrink(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let bias = ctx.attr_f("bias", 0.0) as f64;
    let lambd = ctx.attr_f("lambd", 0.5) as f64;
    let out = crate::with_numeric!(x.dtype(), T, {
        map_same::<T>(x, |v| {
            let w = v.to_f64();
            T::from_f64(if w < -lambd {
                w + bias
            } else if w > lambd {
                w - bias
            } else {
                0.0
            })
        })?
    });
    Ok(vec![out])
}

/// `pred` over a float tensor (float8 kinds are decoded first), giving a bool tensor.
fn float_test(x: &Tensor, pred: impl Fn(f64) -> bool + Sync) -> Result<Tensor> {
    let x = match x.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => x.clone(),
        d if d.is_float() => cast_tensor(x, DType::F32, true, RoundMode::Up)?,
        d => return Err(Error::DType(format!("unsupported dtype {d} (expected a float type)"))),
    };
    let mut out = Tensor::zeros(DType::Bool, x.shape());
    let o = out.view_mut::<bool>()?;
    crate::with_float!(x.dtype(), T, { par_map(x.view::<T>()?, o, |v| pred(Arith::to_f64(v))) });
    Ok(out)
}

fn isnan(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![float_test(ctx.input(inputs, 0)?, f64::is_nan)?])
}

fn isinf(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let pos = ctx.attr_i("detect_positive", 1) != 0;
    let neg = ctx.attr_i("detect_negative", 1) != 0;
    let out = float_test(ctx.input(inputs, 0)?, |v| {
        (pos && v == f64::INFINITY) || (neg && v == f64::NEG_INFINITY)
    })?;
    Ok(vec![out])
}

fn not(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let mut out = Tensor::zeros(DType::Bool, x.shape());
    par_map(x.view::<bool>()?, out.view_mut::<bool>()?, |v| !v);
    Ok(vec![out])
}

fn bitwise_not(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let out = crate::with_int!(x.dtype(), T, { map_same::<T>(x, |v| !v)? });
    Ok(vec![out])
}

/// Identity passes any value through: tensors of every dtype, sequences, optionals.
fn identity(_ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    match inputs.first() {
        Some(Some(v)) => Ok(vec![v.clone()]),
        _ => Err(Error::Other("required input 0 is missing".into())),
    }
}

pub fn register(r: &mut Registry) {
    r.add("Abs", abs);
    r.add("Neg", neg);
    r.add("Sign", sign);
    r.add("Reciprocal", reciprocal);
    r.add("Floor", floor);
    r.add("Ceil", ceil);
    r.add("Round", round);
    r.add("Sqrt", sqrt);
    r.add("Exp", exp);
    r.add("Log", log);
    r.add("Erf", erf);
    r.add("Sin", sin);
    r.add("Cos", cos);
    r.add("Tan", tan);
    r.add("Asin", asin);
    r.add("Acos", acos);
    r.add("Atan", atan);
    r.add("Sinh", sinh);
    r.add("Cosh", cosh);
    r.add("Asinh", asinh);
    r.add("Acosh", acosh);
    r.add("Atanh", atanh);
    r.add("Tanh", tanh);
    r.add("Sigmoid", sigmoid);
    r.add("Relu", relu);
    r.add("LeakyRelu", leaky_relu);
    r.add("Elu", elu);
    r.add("Selu", selu);
    r.add("Celu", celu);
    r.add("ThresholdedRelu", thresholded_relu);
    r.add("HardSigmoid", hard_sigmoid);
    r.add("HardSwish", hardswish);
    r.add("Softplus", softplus);
    r.add("Softsign", softsign);
    r.add("Mish", mish);
    r.add("Gelu", gelu);
    r.add("Swish", swish);
    r.add("Clip", clip);
    r.add("Shrink", shrink);
    r.add("IsNaN", isnan);
    r.add("IsInf", isinf);
    r.add("Not", not);
    r.add("BitwiseNot", bitwise_not);
    r.add_value("Identity", identity);
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::testing::*;
    use super::*;

    fn f32s(op: &str, attrs: Vec<kiln_runtime::manifest::Attr>, x: &[f32]) -> Vec<f32> {
        let out = run(op, 22, attrs, vec![t(&[x.len()], x.to_vec())]).unwrap();
        out.view::<f32>().unwrap().to_vec()
    }

    fn close(got: &[f32], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= 1e-7 + 1e-6 * w.abs(), "got {g}, want {w}");
        }
    }

    #[test]
    fn math() {
        close(&f32s("Erf", vec![], &[0.0, 0.5, -1.0, 2.0, 1e-4]), &[0.0, 0.520_499_877_813_046_5, -0.842_700_792_949_714_9, 0.995_322_265_018_952_7, 1.128_379_163_334_248_6e-4]);
        assert_eq!(f32s("Round", vec![], &[0.5, 1.5, 2.5, -2.5, -1.1, 2.7]), [0.0, 2.0, 2.0, -2.0, -1.0, 3.0]);
        close(&f32s("Sigmoid", vec![], &[0.0, -100.0, 100.0, 1.0]), &[0.5, 3.720_075_976_020_836e-44, 1.0, 0.731_058_578_630_004_9]);
        close(&f32s("Softplus", vec![], &[0.0, 100.0, -100.0]), &[std::f64::consts::LN_2, 100.0, 3.720_075_976_020_836e-44]);
        close(&f32s("Gelu", vec![], &[1.0, -1.0]), &[0.841_344_746_068_542_9, -0.158_655_253_931_457_05]);
        close(&f32s("Gelu", vec![as_("approximate", "tanh")], &[1.0]), &[0.841_191_990_607_477_2]);
        close(&f32s("Mish", vec![], &[1.0]), &[0.865_098_388_287_188_3]);
        close(&f32s("HardSwish", vec![], &[-4.0, 1.0, 4.0]), &[0.0, 2.0 / 3.0, 4.0]);
        close(&f32s("Selu", vec![], &[-1.0, 2.0]), &[-1.111_330_737_812_562_6, 2.101_402_044_296_264_6]);
        close(&f32s("Celu", vec![af("alpha", 2.0)], &[-1.0, 3.0]), &[-0.786_938_680_574_733, 3.0]);
        close(&f32s("Swish", vec![af("alpha", 2.0)], &[1.0]), &[0.880_797_077_977_882_3]);
        close(&f32s("LeakyRelu", vec![], &[-2.0, 3.0]), &[-0.02, 3.0]);
        close(&f32s("ThresholdedRelu", vec![af("alpha", 2.0)], &[2.0, 2.5]), &[0.0, 2.5]);
        let h = run("Sqrt", 13, vec![], vec![t(&[1], vec![f16::from_f32(4.0)])]).unwrap();
        assert_eq!(h.view::<f16>().unwrap(), &[f16::from_f32(2.0)]);
    }

    #[test]
    fn integer_capable_ops() {
        let x = || t(&[4], vec![-128i8, -3, 0, 5]);
        assert_eq!(run("Abs", 13, vec![], vec![x()]).unwrap().view::<i8>().unwrap(), &[-128, 3, 0, 5]);
        assert_eq!(run("Neg", 13, vec![], vec![x()]).unwrap().view::<i8>().unwrap(), &[-128, 3, 0, -5]);
        assert_eq!(run("Sign", 13, vec![], vec![x()]).unwrap().view::<i8>().unwrap(), &[-1, -1, 0, 1]);
        assert_eq!(run("Relu", 14, vec![], vec![x()]).unwrap().view::<i8>().unwrap(), &[0, 0, 0, 5]);
        assert_eq!(run("BitwiseNot", 18, vec![], vec![x()]).unwrap().view::<i8>().unwrap(), &[127, 2, -1, -6]);
        let out = run("Shrink", 9, vec![af("lambd", 1.5), af("bias", 1.0)], vec![x()]).unwrap();
        assert_eq!(out.view::<i8>().unwrap(), &[-127, -2, 0, 4]);
    }

    #[test]
    fn clip_versions() {
        let x = || t(&[4], vec![-2.0f32, 0.5, 3.0, f32::NAN]);
        let out = run("Clip", 6, vec![af("min", -1.0), af("max", 1.0)], vec![x()]).unwrap();
        let v = out.view::<f32>().unwrap();
        assert_eq!(&v[..3], &[-1.0, 0.5, 1.0]);
        assert!(v[3].is_nan());
        let out = run("Clip", 13, vec![], vec![x(), None, t(&[], vec![0.0f32])]).unwrap();
        assert_eq!(&out.view::<f32>().unwrap()[..3], &[-2.0, 0.0, 0.0]);
        // min > max: everything becomes max, like numpy.
        let out = run("Clip", 13, vec![], vec![x(), t(&[], vec![2.0f32]), t(&[], vec![1.0f32])]).unwrap();
        assert_eq!(&out.view::<f32>().unwrap()[..3], &[1.0, 1.0, 1.0]);
        let out = run("Clip", 13, vec![], vec![t(&[3], vec![-5i8, 0, 9]), t(&[], vec![-1i8])]).unwrap();
        assert_eq!(out.view::<i8>().unwrap(), &[-1, 0, 9]);
    }

    #[test]
    fn predicates_and_identity() {
        let x = || t(&[4], vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0]);
        assert_eq!(run("IsNaN", 20, vec![], vec![x()]).unwrap().view::<bool>().unwrap(), &[true, false, false, false]);
        assert_eq!(run("IsInf", 20, vec![], vec![x()]).unwrap().view::<bool>().unwrap(), &[false, true, true, false]);
        let neg = run("IsInf", 20, vec![ai("detect_positive", 0)], vec![x()]).unwrap();
        assert_eq!(neg.view::<bool>().unwrap(), &[false, false, true, false]);
        // E5M2 codes: +inf, NaN, 1.0
        let f8 = Some(Tensor::from_slice_as(DType::F8E5M2, &[3], &[0x7Cu8, 0x7E, 0x3C]).unwrap());
        assert_eq!(run("IsInf", 20, vec![], vec![f8.clone()]).unwrap().view::<bool>().unwrap(), &[true, false, false]);
        assert_eq!(run("IsNaN", 20, vec![], vec![f8]).unwrap().view::<bool>().unwrap(), &[false, true, false]);
        assert_eq!(run("Not", 1, vec![], vec![t(&[2], vec![true, false])]).unwrap().view::<bool>().unwrap(), &[false, true]);
        let s = Value::Tensor(Tensor::from_strings(&[1], vec!["a".into()]).unwrap());
        let step = kiln_runtime::manifest::Step { op: "Identity".into(), opset: 16, outputs: vec![0], ..Default::default() };
        let out = identity(&OpCtx::new(&step, None), &[Some(s)]).unwrap();
        assert_eq!(out[0].tensor().unwrap().strings().unwrap(), &["a"]);
    }
}
