//! Elementwise unary ops: math (Abs, Neg, Sign, Sqrt, Exp, Log, trig…), activations (Relu,
//! Sigmoid, Gelu, Elu, Selu, Mish, HardSwish…), Clip, Shrink, IsNaN/IsInf, Not, BitwiseNot,
//! Identity. Float ops run natively on f32/f64 and through f32 for f16/bf16.

use half::{bf16, f16};
use kiln_runtime::{DType, Elem, Error, Result, Tensor, Value};
use rayon::prelude::*;

use super::cast::{cast_tensor, RoundMode};
use super::elementwise::{par_map, Arith, OwnedKernel};
use crate::cpu::ctx::OpCtx;
use crate::cpu::gemm::{self, apply_act, Act};
use crate::cpu::registry::Registry;

/// Special functions std lacks, for the compute types.
trait Special: Copy {
    fn erf_(self) -> Self;
}

impl Special for f32 {
    /// The GEMM epilogue's polynomial erf (relative error near 1e-7): vectorises, where libm's
    /// does not.
    #[inline(always)]
    fn erf_(self) -> f32 {
        gemm::erf(self)
    }
}

impl Special for f64 {
    fn erf_(self) -> f64 {
        libm::erf(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Execution: ISA dispatch, parallel split, in-place reuse of a dead input.

pub(crate) use crate::cpu::isa::with_isa;

/// Elements per parallel task; smaller tensors stay on the calling thread (a rayon split costs
/// more than mapping a few thousand elements).
pub(crate) const TASK: usize = 1 << 15;

/// Elements per block when a map copies and transforms (the block stays in L1 between the two).
const BLOCK: usize = 2048;

/// `f(start, chunk)` over `v` split into chunks (`start` = the chunk's offset in `v`), compiled
/// for the active ISA (when `f` is an `#[inline(always)]` closure), across the pool when `v` is large.
pub(crate) fn transform<T: Send>(v: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    if v.len() >= 2 * TASK && crate::cpu::par::threads() > 1 {
        v.par_chunks_mut(TASK).enumerate().for_each(|(i, c)| with_isa(#[inline(always)] || f(i * TASK, c)));
    } else if !v.is_empty() {
        with_isa(#[inline(always)] || f(0, v));
    }
}

/// The input `i` taken out of an owned input list.
pub(crate) fn take_input(inputs: &mut [Option<Tensor>], i: usize) -> Result<Tensor> {
    inputs
        .get_mut(i)
        .and_then(Option::take)
        .ok_or_else(|| Error::Other(format!("required input {i} is missing")))
}

/// `f` applied to every element of `x` (result of x's dtype): in x's own buffer when x is its
/// only owner (a dead intermediate handed over by the interpreter), else into a new tensor.
pub(crate) fn map_same<T: Elem>(x: Tensor, f: impl Fn(T) -> T + Sync) -> Result<Tensor> {
    let mut x = x;
    if x.is_unique() {
        transform(x.view_mut::<T>()?, #[inline(always)]
        |_, c| {
            for v in c.iter_mut() {
                *v = f(*v);
            }
        });
        return Ok(x);
    }
    let src = x.view::<T>()?;
    Tensor::filled_by::<T>(x.dtype(), x.shape(), |out| {
        transform(out, #[inline(always)]
        |s, c| {
            for (o, &v) in c.iter_mut().zip(&src[s..]) {
                *o = f(v);
            }
        });
        Ok(())
    })
}

/// An f32 op given as an in-place slice transform `f`: run on x's buffer when x is unique, else
/// block by block on a copy (copy a block, transform it while it is in L1).
pub(crate) fn map_f32_slices(x: Tensor, f: impl Fn(&mut [f32]) + Sync) -> Result<Tensor> {
    let mut x = x;
    if x.is_unique() {
        transform(x.view_mut::<f32>()?, #[inline(always)]
        |_, c| {
            for b in c.chunks_mut(BLOCK) {
                f(b);
            }
        });
        return Ok(x);
    }
    let src = x.view::<f32>()?;
    Tensor::filled_by::<f32>(DType::F32, x.shape(), |out| {
        transform(out, #[inline(always)]
        |s, c| {
            for (k, b) in c.chunks_mut(BLOCK).enumerate() {
                let o = s + k * BLOCK;
                b.copy_from_slice(&src[o..o + b.len()]);
                f(b);
            }
        });
        Ok(())
    })
}

/// One of the GEMM epilogue's vectorised activations over an f32 tensor.
fn act_f32(x: Tensor, act: Act) -> Result<Tensor> {
    map_f32_slices(x, #[inline(always)] move |b| apply_act(b, act))
}

/// exp(x) for f32 over the whole range, from the shared vectorisable `exp` (which clamps its
/// argument to where the result is a normal number): the ends are shifted into that range and
/// scaled back, so large x overflows to inf and very negative x gives subnormals and 0.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const EXP_M40: f32 = 4.248_354_3e-18;
    let hi = x > 88.0;
    let lo = x < -80.0;
    let y = if hi { x - 1.0 } else if lo { x + 40.0 } else { x };
    let s = if hi { std::f32::consts::E } else if lo { EXP_M40 } else { 1.0 };
    gemm::exp(y) * s
}

// ---------------------------------------------------------------------------------------------
// Float ops.

/// A new tensor (or `x` reused) of `x`'s dtype and shape with `|$v: $R| $body` applied to every
/// element; `$R` is bound to the compute type (f32 or f64).
macro_rules! float_map {
    ($x:expr, $R:ident, |$v:ident| $body:expr) => {{
        let x: Tensor = $x;
        match x.dtype() {
            DType::F32 => {
                type $R = f32;
                map_same::<f32>(x, #[inline(always)] |$v: $R| $body)?
            }
            DType::F64 => {
                type $R = f64;
                map_same::<f64>(x, #[inline(always)] |$v: $R| $body)?
            }
            DType::F16 => {
                type $R = f32;
                map_same::<f16>(x, #[inline(always)] |h: f16| {
                    let $v: $R = h.to_f32();
                    f16::from_f32($body)
                })?
            }
            DType::BF16 => {
                type $R = f32;
                map_same::<bf16>(x, #[inline(always)] |h: bf16| {
                    let $v: $R = h.to_f32();
                    bf16::from_f32($body)
                })?
            }
            d => return Err(Error::DType(format!("unsupported dtype {d} (expected a float type)"))),
        }
    }};
}

/// A float unary kernel: `$setup` reads attributes (with `$ctx`), then `$body` maps each `$v`.
/// With `f32 => $act`, f32 tensors take the vectorised epilogue activation instead.
macro_rules! float_kernel {
    ($name:ident, $R:ident, |$ctx:ident, $v:ident| { $($setup:tt)* } => $body:expr) => {
        float_kernel!($name, $R, |$ctx, $v| { $($setup)* } f32 => None::<Act>, $body);
    };
    ($name:ident, $R:ident, |$ctx:ident, $v:ident| { $($setup:tt)* } f32 => $act:expr, $body:expr) => {
        #[allow(unused_variables)]
        fn $name($ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
            let x = take_input(&mut inputs, 0)?;
            $($setup)*
            if x.dtype() == DType::F32 {
                if let Some(act) = $act {
                    return Ok(vec![act_f32(x, act)?]);
                }
            }
            Ok(vec![float_map!(x, $R, |$v| $body)])
        }
    };
}

float_kernel!(reciprocal, R, |_c, v| {} => 1.0 / v);
float_kernel!(floor, R, |_c, v| {} => v.floor());
float_kernel!(ceil, R, |_c, v| {} => v.ceil());
float_kernel!(round, R, |_c, v| {} => v.round_ties_even());
float_kernel!(sqrt, R, |_c, v| {} => v.sqrt());
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
float_kernel!(tanh, R, |_c, v| {} f32 => Some(Act::Tanh), v.tanh());
float_kernel!(sigmoid, R, |_c, v| {} f32 => Some(Act::Sigmoid), sigmoid_of(v));
float_kernel!(softsign, R, |_c, v| {} => v / (1.0 + v.abs()));
float_kernel!(softplus, R, |_c, v| {} => softplus_of(v));
float_kernel!(mish, R, |_c, v| {} => v * softplus_of(v).tanh());
float_kernel!(hardswish, R, |_c, v| {} f32 => Some(Act::HardSwish), v * (v / 6.0 + 0.5).clamp(0.0, 1.0));
float_kernel!(leaky_relu, R, |c, v| { let alpha = c.attr_f("alpha", 0.01); }
    f32 => Some(Act::LeakyRelu(alpha)), if v < 0.0 { v * alpha as R } else { v });
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
    } f32 => Some(Act::HardSigmoid(alpha, beta)), (alpha as R * v + beta as R).clamp(0.0, 1.0));
float_kernel!(swish, R, |c, v| { let alpha = c.attr_f("alpha", 1.0); }
    f32 => (alpha == 1.0).then_some(Act::Silu), v * sigmoid_of(alpha as R * v));

fn exp(_ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = take_input(&mut inputs, 0)?;
    if x.dtype() == DType::F32 {
        return Ok(vec![map_f32_slices(x, #[inline(always)]
        |b| {
            for v in b.iter_mut() {
                *v = exp_f32(*v);
            }
        })?]);
    }
    Ok(vec![float_map!(x, R, |v| v.exp())])
}

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

fn gelu(ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = take_input(&mut inputs, 0)?;
    let approx = ctx.attr_s("approximate", "none");
    let tanh = match approx.as_str() {
        "none" => false,
        "tanh" => true,
        a => return Err(ctx.unsupported(format!("approximate='{a}'"))),
    };
    if x.dtype() == DType::F32 {
        return Ok(vec![act_f32(x, if tanh { Act::GeluTanh } else { Act::GeluErf })?]);
    }
    let out = if tanh {
        float_map!(x, R, |v| {
            let k = (2.0 / std::f64::consts::PI).sqrt() as R;
            0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())
        })
    } else {
        float_map!(x, R, |v| 0.5 * v * (1.0 + (v * std::f64::consts::FRAC_1_SQRT_2 as R).erf_()))
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

fn abs(_ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = take_input(&mut inputs, 0)?;
    if x.dtype().is_float() {
        return Ok(vec![float_map!(x, R, |v| v.abs())]);
    }
    let out = crate::with_int!(x.dtype(), T, {
        map_same::<T>(x, |v| if v < T::ZERO { T::ZERO.sub(v) } else { v })?
    });
    Ok(vec![out])
}

fn neg(_ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = take_input(&mut inputs, 0)?;
    if x.dtype().is_float() {
        return Ok(vec![float_map!(x, R, |v| -v)]);
    }
    let out = crate::with_int!(x.dtype(), T, { map_same::<T>(x, |v| T::ZERO.sub(v))? });
    Ok(vec![out])
}

fn sign(_ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = take_input(&mut inputs, 0)?;
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

fn relu(_ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = take_input(&mut inputs, 0)?;
    if x.dtype() == DType::F32 {
        return Ok(vec![act_f32(x, Act::Relu)?]);
    }
    let out = crate::with_numeric!(x.dtype(), T, {
        map_same::<T>(x, |v: T| if v < T::ZERO { T::ZERO } else { v })?
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

fn clip(ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = take_input(&mut inputs, 0)?;
    let dt = x.dtype();
    let out = crate::with_numeric!(dt, T, {
        let (lo, hi): (Option<T>, Option<T>) = if ctx.opset() < 11 {
            let f = |name: &str| ctx.attr_f_opt(name).map(|v| T::from_f64(v as f64));
            (f("min"), f("max"))
        } else {
            (bound(ctx.opt_input(&inputs, 1), dt)?, bound(ctx.opt_input(&inputs, 2), dt)?)
        };
        if dt == DType::F32 {
            // The epilogue's clip has the same select order (and NaN behaviour) as below.
            let lo = lo.map_or(f64::NEG_INFINITY, |v| v.to_f64()) as f32;
            let hi = hi.map_or(f64::INFINITY, |v| v.to_f64()) as f32;
            return Ok(vec![act_f32(x, Act::Clip(lo, hi))?]);
        }
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

fn shrink(ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = take_input(&mut inputs, 0)?;
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

fn isnan(ctx: &OpCtx, inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    Ok(vec![float_test(ctx.input(&inputs, 0)?, f64::is_nan)?])
}

fn isinf(ctx: &OpCtx, inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let pos = ctx.attr_i("detect_positive", 1) != 0;
    let neg = ctx.attr_i("detect_negative", 1) != 0;
    let out = float_test(ctx.input(&inputs, 0)?, |v| {
        (pos && v == f64::INFINITY) || (neg && v == f64::NEG_INFINITY)
    })?;
    Ok(vec![out])
}

fn not(_ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = take_input(&mut inputs, 0)?;
    if x.dtype() != DType::Bool {
        return Err(Error::DType(format!("expected bool, got {}", x.dtype())));
    }
    Ok(vec![map_same::<bool>(x, |v| !v)?])
}

fn bitwise_not(_ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = take_input(&mut inputs, 0)?;
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

/// Registers every kernel of the table for the registry (borrowing its inputs) and lists the
/// same kernels for the interpreter's owned calls (which hand over dead inputs for reuse).
macro_rules! kernel_table {
    ($($op:literal => $f:ident),* $(,)?) => {
        pub fn register(r: &mut Registry) {
            $(r.add($op, {
                fn borrowed(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
                    $f(ctx, inputs.to_vec())
                }
                borrowed
            });)*
            r.add_value("Identity", identity);
        }

        /// The owned-input form of this file's kernel for `op`, if it has one.
        pub(crate) fn owned(op: &str) -> Option<OwnedKernel> {
            match op {
                $($op => Some($f as OwnedKernel),)*
                _ => None,
            }
        }
    };
}

kernel_table! {
    "Abs" => abs,
    "Neg" => neg,
    "Sign" => sign,
    "Reciprocal" => reciprocal,
    "Floor" => floor,
    "Ceil" => ceil,
    "Round" => round,
    "Sqrt" => sqrt,
    "Exp" => exp,
    "Log" => log,
    "Erf" => erf,
    "Sin" => sin,
    "Cos" => cos,
    "Tan" => tan,
    "Asin" => asin,
    "Acos" => acos,
    "Atan" => atan,
    "Sinh" => sinh,
    "Cosh" => cosh,
    "Asinh" => asinh,
    "Acosh" => acosh,
    "Atanh" => atanh,
    "Tanh" => tanh,
    "Sigmoid" => sigmoid,
    "Relu" => relu,
    "LeakyRelu" => leaky_relu,
    "Elu" => elu,
    "Selu" => selu,
    "Celu" => celu,
    "ThresholdedRelu" => thresholded_relu,
    "HardSigmoid" => hard_sigmoid,
    "HardSwish" => hardswish,
    "Softplus" => softplus,
    "Softsign" => softsign,
    "Mish" => mish,
    "Gelu" => gelu,
    "Swish" => swish,
    "Clip" => clip,
    "Shrink" => shrink,
    "IsNaN" => isnan,
    "IsInf" => isinf,
    "Not" => not,
    "BitwiseNot" => bitwise_not,
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

    /// f64 references of the ops with vectorised f32 paths.
    fn reference(op: &str, x: f64) -> f64 {
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        match op {
            "Exp" => x.exp(),
            "Sigmoid" => sig(x),
            "Relu" => x.max(0.0),
            "HardSwish" => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            "HardSigmoid" => (0.2 * x + 0.5).clamp(0.0, 1.0),
            "LeakyRelu" => if x < 0.0 { 0.01 * x } else { x },
            "Swish" => x * sig(x),
            "Gelu" => 0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2),
            "Clip" => x.clamp(-1.5, 2.5),
            _ => unreachable!(),
        }
    }

    #[test]
    fn vectorised_f32_ops_match_reference_in_place_and_copied() {
        let mut xs = super::super::elementwise::testing::rand_f32(70_001, 7, 12.0);
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 88.5, 88.8, -87.0, -90.0, -104.0, -200.0, 1000.0, -1000.0]);
        for op in ["Exp", "Sigmoid", "Relu", "HardSwish", "HardSigmoid", "LeakyRelu", "Swish", "Gelu", "Clip"] {
            let clip = || vec![t(&[], vec![-1.5f32]), t(&[], vec![2.5f32])];
            for in_place in [false, true] {
                let x = Tensor::from_vec(&[xs.len()], xs.clone()).unwrap();
                let held = (!in_place).then(|| x.clone());
                let mut ins = vec![Some(x)];
                if op == "Clip" {
                    ins.extend(clip());
                }
                let y = run_owned(op, 20, vec![], ins).unwrap().remove(0);
                for (&v, &g) in xs.iter().zip(y.view::<f32>().unwrap()) {
                    let w = reference(op, v as f64);
                    // Absolute slack for results that cancel to near 0 (HardSigmoid: 0.2x + 0.5 in f32).
                    let tol = 1e-7 + 2e-6 * w.abs();
                    assert!((g as f64 - w).abs() <= tol || (w > f32::MAX as f64 && g == f32::INFINITY), "{op}({v}) = {g}, want {w}");
                }
                if let Some(h) = held {
                    assert_eq!(h.view::<f32>().unwrap(), &xs[..], "{op} changed a shared input");
                }
            }
        }
        let special = run("Exp", 13, vec![], vec![t(&[4], vec![f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 89.0])]).unwrap();
        let v = special.view::<f32>().unwrap();
        assert_eq!((v[0], v[1], v[3]), (f32::INFINITY, 0.0, f32::INFINITY));
        assert!(v[2].is_nan());
        for op in ["Sigmoid", "Relu", "HardSwish", "Gelu"] {
            let y = run(op, 20, vec![], vec![t(&[1], vec![f32::NAN])]).unwrap();
            assert!(y.view::<f32>().unwrap()[0].is_nan(), "{op}(NaN)");
        }
        let e = run("Sigmoid", 13, vec![], vec![t(&[0, 4], Vec::<f32>::new())]).unwrap();
        assert_eq!(e.shape(), &[0, 4]);
    }

    #[test]
    fn in_place_generic_maps() {
        // f16 and integer maps through the owned path, unique and shared.
        let h = |v: f32| f16::from_f32(v);
        let x = Tensor::from_vec(&[3], vec![h(-1.0), h(0.25), h(4.0)]).unwrap();
        let held = x.clone();
        let y = run_owned("Sqrt", 13, vec![], vec![Some(x)]).unwrap().remove(0);
        assert!(y.view::<f16>().unwrap()[0].is_nan());
        assert_eq!(&y.view::<f16>().unwrap()[1..], &[h(0.5), h(2.0)]);
        assert_eq!(held.view::<f16>().unwrap()[0], h(-1.0));
        let y = run_owned("Neg", 13, vec![], vec![t(&[2], vec![i64::MIN, 5])]).unwrap().remove(0);
        assert_eq!(y.view::<i64>().unwrap(), &[i64::MIN, -5]);
        let y = run_owned("Not", 1, vec![], vec![t(&[2], vec![true, false])]).unwrap().remove(0);
        assert_eq!(y.view::<bool>().unwrap(), &[false, true]);
    }
}
