//! Cast, CastLike and BitCast between every ONNX dtype: floats, integers, bool, strings, and the
//! low-precision kinds (float8 E4M3FN/E4M3FNUZ/E5M2/E5M2FNUZ/E8M0, float4 E2M1, int4/uint4,
//! int2/uint2),
//! whose bit-level encodings are implemented here (round to nearest even, saturation, NaN/Inf
//! handling as the ONNX Cast tables and reference implementation specify).
//!
//! Other kernels (quantisation) can use `cast_tensor`, `f8_encode`/`f8_decode` and `reinterpret`.

use half::{bf16, f16};
use kiln_runtime::{DType, Elem, Error, Result, Tensor};

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;

use super::elementwise::par_map;

// ---------------------------------------------------------------------------------------------
// Plain numeric conversions.

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Float,
    Signed,
    Unsigned,
    Bool,
}

/// An element type Cast converts between directly (floats, integers, bool).
pub(crate) trait Num: Elem {
    const KIND: Kind;
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
    /// Integer value (u64 wraps; floats truncate toward zero, saturating, NaN to 0).
    fn to_i64(self) -> i64;
    fn to_u64(self) -> u64;
    /// Floats round to nearest even; integers truncate and saturate; bool is `!= 0`.
    fn from_f64(v: f64) -> Self;
    fn from_f32(v: f32) -> Self;
    /// Integers wrap (two's complement); floats round; bool is `!= 0`.
    fn from_i64(v: i64) -> Self;
    fn from_u64(v: u64) -> Self;
}

macro_rules! num_int {
    ($kind:ident: $($t:ty),*) => {$(
        impl Num for $t {
            const KIND: Kind = Kind::$kind;
            #[inline(always)] fn to_f64(self) -> f64 { self as f64 }
            #[inline(always)] fn to_f32(self) -> f32 { self as f32 }
            #[inline(always)] fn to_i64(self) -> i64 { self as i64 }
            #[inline(always)] fn to_u64(self) -> u64 { self as u64 }
            #[inline(always)] fn from_f64(v: f64) -> Self { v as $t }
            #[inline(always)] fn from_f32(v: f32) -> Self { v as $t }
            #[inline(always)] fn from_i64(v: i64) -> Self { v as $t }
            #[inline(always)] fn from_u64(v: u64) -> Self { v as $t }
        }
    )*};
}
num_int!(Signed: i8, i16, i32, i64);
num_int!(Unsigned: u8, u16, u32, u64);

macro_rules! num_float {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const KIND: Kind = Kind::Float;
            #[inline(always)] fn to_f64(self) -> f64 { self as f64 }
            #[inline(always)] fn to_f32(self) -> f32 { self as f32 }
            #[inline(always)] fn to_i64(self) -> i64 { self as i64 }
            #[inline(always)] fn to_u64(self) -> u64 { self as u64 }
            #[inline(always)] fn from_f64(v: f64) -> Self { v as $t }
            #[inline(always)] fn from_f32(v: f32) -> Self { v as $t }
            #[inline(always)] fn from_i64(v: i64) -> Self { v as $t }
            #[inline(always)] fn from_u64(v: u64) -> Self { v as $t }
        }
    )*};
}
num_float!(f32, f64);

macro_rules! num_half {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const KIND: Kind = Kind::Float;
            #[inline(always)] fn to_f64(self) -> f64 { <$t>::to_f64(self) }
            #[inline(always)] fn to_f32(self) -> f32 { <$t>::to_f32(self) }
            #[inline(always)] fn to_i64(self) -> i64 { <$t>::to_f32(self) as i64 }
            #[inline(always)] fn to_u64(self) -> u64 { <$t>::to_f32(self) as u64 }
            #[inline(always)] fn from_f64(v: f64) -> Self { <$t>::from_f64(v) }
            #[inline(always)] fn from_f32(v: f32) -> Self { <$t>::from_f32(v) }
            #[inline(always)] fn from_i64(v: i64) -> Self { <$t>::from_f64(v as f64) }
            #[inline(always)] fn from_u64(v: u64) -> Self { <$t>::from_f64(v as f64) }
        }
    )*};
}
num_half!(f16, bf16);

impl Num for bool {
    const KIND: Kind = Kind::Bool;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as u8 as f32
    }
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
    #[inline(always)]
    fn to_u64(self) -> u64 {
        self as u64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v != 0.0
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v != 0.0
    }
    #[inline(always)]
    fn from_i64(v: i64) -> Self {
        v != 0
    }
    #[inline(always)]
    fn from_u64(v: u64) -> Self {
        v != 0
    }
}

/// Convert one element following the ONNX Cast rules (integers wrap, floats round to nearest
/// even, float to integer truncates toward zero, anything nonzero (or NaN) is true).
#[inline(always)]
pub(crate) fn convert<S: Num, D: Num>(s: S) -> D {
    match (S::KIND, D::KIND) {
        (Kind::Signed | Kind::Bool, _) => D::from_i64(s.to_i64()),
        (Kind::Unsigned, _) => D::from_u64(s.to_u64()),
        (Kind::Float, Kind::Float) => {
            if S::DTYPE == DType::F64 {
                D::from_f64(s.to_f64())
            } else {
                D::from_f32(s.to_f32())
            }
        }
        (Kind::Float, Kind::Bool) => D::from_i64((s.to_f64() != 0.0) as i64),
        (Kind::Float, _) => {
            // Out-of-range values are undefined in ONNX; like numpy, negative values reach
            // unsigned types through the signed conversion.
            let v = s.to_f64();
            if D::DTYPE == DType::U64 && v >= 0.0 {
                D::from_u64(v as u64)
            } else {
                D::from_i64(v as i64)
            }
        }
    }
}

/// Bind `$T` for any dtype `Num` covers (floats, integers, bool).
macro_rules! with_num {
    ($dtype:expr, $T:ident, $body:block) => {
        match $dtype {
            DType::Bool => { type $T = bool; $body }
            d => crate::with_numeric!(d, $T, $body),
        }
    };
}

fn convert_plain(x: &Tensor, to: DType) -> Result<Tensor> {
    let mut out = Tensor::zeros(to, x.shape());
    with_num!(x.dtype(), S, {
        let src = x.view::<S>()?;
        with_num!(to, D, {
            par_map(src, out.view_mut::<D>()?, convert::<S, D>);
        })
    });
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Float8 / float4 encodings.

/// A small float format: field widths, bias, largest finite magnitude code, and how it spells
/// NaN / infinity / negative zero.
#[derive(Clone, Copy, Debug)]
pub(crate) struct F8Format {
    ebits: u32,
    mbits: u32,
    bias: i32,
    /// Largest finite magnitude code (sign bit clear).
    max_code: u8,
    /// "Unsigned zero": no -0, and the only NaN is the negative-zero code (0x80).
    uz: bool,
    /// Has infinities (E5M2).
    inf: bool,
    /// Has no NaN at all (float4).
    no_nan: bool,
}

pub(crate) const E4M3FN: F8Format =
    F8Format { ebits: 4, mbits: 3, bias: 7, max_code: 0x7E, uz: false, inf: false, no_nan: false };
pub(crate) const E4M3FNUZ: F8Format =
    F8Format { ebits: 4, mbits: 3, bias: 8, max_code: 0x7F, uz: true, inf: false, no_nan: false };
pub(crate) const E5M2: F8Format =
    F8Format { ebits: 5, mbits: 2, bias: 15, max_code: 0x7B, uz: false, inf: true, no_nan: false };
pub(crate) const E5M2FNUZ: F8Format =
    F8Format { ebits: 5, mbits: 2, bias: 16, max_code: 0x7F, uz: true, inf: false, no_nan: false };
pub(crate) const E2M1: F8Format =
    F8Format { ebits: 2, mbits: 1, bias: 1, max_code: 0x7, uz: false, inf: false, no_nan: true };

impl F8Format {
    pub(crate) fn of(dt: DType) -> Option<F8Format> {
        match dt {
            DType::F8E4M3FN => Some(E4M3FN),
            DType::F8E4M3FNUZ => Some(E4M3FNUZ),
            DType::F8E5M2 => Some(E5M2),
            DType::F8E5M2FNUZ => Some(E5M2FNUZ),
            DType::F4E2M1 => Some(E2M1),
            _ => None,
        }
    }

    fn sign_bit(&self) -> u8 {
        1 << (self.ebits + self.mbits)
    }

    fn nan(&self, neg: bool) -> u8 {
        if self.uz {
            0x80
        } else if self.inf {
            // A quiet NaN, as ml_dtypes produces.
            0x7E | if neg { 0x80 } else { 0 }
        } else {
            0x7F | if neg { 0x80 } else { 0 }
        }
    }
}

/// Encode `v` in format `f`, rounding to nearest even. With `saturate`, out-of-range values and
/// infinities clamp to the largest finite value; without it they become Inf (E5M2) or NaN.
/// Float4 has neither and always saturates; its NaN becomes a zero whose sign bit is the
/// opposite of the NaN's (what ml_dtypes, and so the ONNX reference, produces).
pub(crate) fn f8_encode(v: f64, f: &F8Format, saturate: bool) -> u8 {
    let neg = v.is_sign_negative();
    let sign = if neg && !f.uz { f.sign_bit() } else { 0 };
    if v.is_nan() {
        return if f.no_nan { if neg { 0 } else { f.sign_bit() } } else { f.nan(neg) };
    }
    let a = v.abs();
    let overflow = |sign: u8| -> u8 {
        if saturate || f.no_nan {
            sign | f.max_code
        } else if f.inf {
            sign | 0x7C
        } else {
            f.nan(neg)
        }
    };
    if a.is_infinite() {
        return overflow(if neg { f.sign_bit() } else { 0 });
    }
    let emin = 1 - f.bias;
    // Exponent of the quantum: subnormals share emin's, normals their own.
    let e = if a == 0.0 { emin } else { (a.log2().floor() as i32).max(emin) };
    // log2 can be off by one near powers of two; fix with exact comparisons.
    let e = if e > emin && a < 2f64.powi(e) {
        e - 1
    } else if a >= 2f64.powi(e + 1) {
        e + 1
    } else {
        e
    };
    let q = (a / 2f64.powi(e - f.mbits as i32)).round_ties_even() as u64;
    // Codes are ordered by magnitude: the biased exponent field starts at 1 for normals, and a
    // mantissa carry rolls into the exponent by itself.
    let mag = if e == emin && q < (1u64 << f.mbits) {
        q
    } else {
        (((e - emin + 1) as u64) << f.mbits) + q - (1u64 << f.mbits)
    };
    if mag > f.max_code as u64 {
        return overflow(if neg { f.sign_bit() } else { 0 });
    }
    if mag == 0 {
        return sign;
    }
    (if neg { f.sign_bit() } else { 0 }) | mag as u8
}

/// Decode a code of format `f`.
pub(crate) fn f8_decode(code: u8, f: &F8Format) -> f32 {
    let code = code & (f.sign_bit() | (f.sign_bit() - 1));
    let neg = code & f.sign_bit() != 0;
    let mag = code & (f.sign_bit() - 1);
    if f.uz && code == 0x80 {
        return f32::NAN;
    }
    let emax_field = (1u8 << f.ebits) - 1;
    let efield = mag >> f.mbits;
    let m = (mag & ((1 << f.mbits) - 1)) as f32;
    if !f.no_nan && !f.uz {
        if f.inf && efield == emax_field {
            let v = if m == 0.0 { f32::INFINITY } else { f32::NAN };
            return if neg { -v } else { v };
        }
        if !f.inf && mag == 0x7F {
            return if neg { -f32::NAN } else { f32::NAN };
        }
    }
    let scale = |e: i32| 2f32.powi(e);
    let v = if efield == 0 {
        m * scale(1 - f.bias - f.mbits as i32)
    } else {
        (1.0 + m * scale(-(f.mbits as i32))) * scale(efield as i32 - f.bias)
    };
    if neg {
        -v
    } else {
        v
    }
}

/// Encode an f32 as float8 E8M0 (a biased power of two, 0xFF = NaN), following the ONNX
/// reference: the sign is ignored, `round_mode` is "up", "down" or "nearest".
pub(crate) fn e8m0_encode(v: f32, saturate: bool, round_mode: RoundMode) -> u8 {
    let bits = v.to_bits();
    let exp = (bits >> 23) & 0xFF;
    if exp == 0xFF {
        return 0xFF;
    }
    let round_up = match round_mode {
        RoundMode::Down => false,
        RoundMode::Up => bits & 0x7F_FFFF != 0,
        RoundMode::Nearest => {
            let g = bits & 0x40_0000 != 0;
            let r = bits & 0x20_0000 != 0;
            let s = bits & 0x1F_FFFF != 0;
            g && (r || s || exp > 0)
        }
    };
    if round_up && !(saturate && exp == 0xFE) {
        (exp + 1) as u8
    } else {
        exp as u8
    }
}

pub(crate) fn e8m0_decode(code: u8) -> f32 {
    if code == 0xFF {
        f32::NAN
    } else {
        // 2^(code-127); code 0 is 2^-127, an f32 subnormal.
        f32::from_bits(if code == 0 { 0x0040_0000 } else { (code as u32) << 23 })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RoundMode {
    Up,
    Down,
    Nearest,
}

impl RoundMode {
    pub(crate) fn parse(s: &str) -> Result<RoundMode> {
        match s {
            "up" => Ok(RoundMode::Up),
            "down" => Ok(RoundMode::Down),
            "nearest" => Ok(RoundMode::Nearest),
            _ => Err(Error::Other(format!("unknown round_mode '{s}'"))),
        }
    }
}

/// A float8/float4/E8M0 tensor decoded to f32 (through a 256-entry table).
fn decode_small_float(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let table: Vec<f32> = match F8Format::of(dt) {
        Some(f) => (0..=255u8).map(|c| f8_decode(c, &f)).collect(),
        None => (0..=255u8).map(e8m0_decode).collect(),
    };
    let mut out = Tensor::zeros(DType::F32, x.shape());
    par_map(x.view::<u8>()?, out.view_mut::<f32>()?, |c| table[c as usize]);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Strings.

/// C's `%.{prec}g`, with ONNX's spellings of the special values ("NaN", "INF", "-INF"); this is
/// what onnxruntime produces for float → string (precision 8).
pub(crate) fn format_g(v: f64, prec: usize) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v < 0.0 { "-INF".into() } else { "INF".into() };
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    let prec = prec.max(1);
    let sci = format!("{:.*e}", prec - 1, v);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let x: i32 = exp.parse().unwrap_or(0);
    if x < -4 || x >= prec as i32 {
        let sign = if x < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip_fraction_zeros(mant), x.abs())
    } else {
        strip_fraction_zeros(&format!("{:.*}", (prec as i32 - 1 - x) as usize, v)).to_string()
    }
}

fn strip_fraction_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

fn to_strings(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let v: Vec<String> = match dt {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {
            x.to_f64_vec()?.into_iter().map(|v| format_g(v, 8)).collect()
        }
        DType::U64 => x.view::<u64>()?.iter().map(|v| v.to_string()).collect(),
        d if d.is_int() || d == DType::Bool => {
            x.to_i64_vec()?.into_iter().map(|v| v.to_string()).collect()
        }
        d => return Err(Error::DType(format!("cannot cast {d} to string"))),
    };
    Tensor::from_strings(x.shape(), v)
}

/// Length of the longest prefix of `s` that reads as a decimal float (strtod-like).
fn float_prefix(s: &[u8]) -> usize {
    let digits = |mut i: usize| {
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    let mut i = if s.first().is_some_and(|c| *c == b'+' || *c == b'-') { 1 } else { 0 };
    let start = i;
    i = digits(i);
    let mut any = i > start;
    if i < s.len() && s[i] == b'.' {
        let j = digits(i + 1);
        any |= j > i + 1;
        i = j;
    }
    if !any {
        return 0;
    }
    if i < s.len() && (s[i] == b'e' || s[i] == b'E') {
        let mut j = i + 1;
        if j < s.len() && (s[j] == b'+' || s[j] == b'-') {
            j += 1;
        }
        let k = digits(j);
        if k > j {
            i = k;
        }
    }
    i
}

/// Parse a float the way Cast does: "INF"/"+INF"/"-INF"/"NaN" in any case, plain and
/// scientific notation, trailing garbage ignored.
pub(crate) fn parse_float(s: &str) -> Result<f64> {
    let t = s.trim();
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let lower = body.to_ascii_lowercase();
    if lower.starts_with("inf") {
        return Ok(if neg { f64::NEG_INFINITY } else { f64::INFINITY });
    }
    if lower.starts_with("nan") {
        return Ok(f64::NAN);
    }
    let n = float_prefix(t.as_bytes());
    t[..n].parse::<f64>().map_err(|_| Error::Other(format!("cannot parse '{s}' as a number")))
}

/// Parse the leading integer of `s` ("100.5" is 100, like onnxruntime's stoll).
pub(crate) fn parse_int(s: &str) -> Result<i64> {
    let t = s.trim().as_bytes();
    let mut n = if t.first().is_some_and(|c| *c == b'+' || *c == b'-') { 1 } else { 0 };
    while n < t.len() && t[n].is_ascii_digit() {
        n += 1;
    }
    let txt = std::str::from_utf8(&t[..n]).unwrap_or("");
    if let Ok(v) = txt.parse::<i64>() {
        return Ok(v);
    }
    // Unsigned values above i64::MAX keep their bits (they wrap back on the cast to u64).
    txt.parse::<u64>()
        .map(|v| v as i64)
        .map_err(|_| Error::Other(format!("cannot parse '{s}' as an integer")))
}

fn from_strings(x: &Tensor, to: DType, saturate: bool, rm: RoundMode) -> Result<Tensor> {
    let s = x.strings()?;
    let shape = x.shape();
    if to == DType::F32 {
        let v = s.iter().map(|s| parse_float(s).map(|v| v as f32)).collect::<Result<Vec<_>>>()?;
        return Tensor::from_vec(shape, v);
    }
    let mid = if to.is_float() {
        Tensor::from_vec(shape, s.iter().map(|s| parse_float(s)).collect::<Result<Vec<_>>>()?)?
    } else {
        Tensor::from_vec(shape, s.iter().map(|s| parse_int(s)).collect::<Result<Vec<_>>>()?)?
    };
    cast_tensor(&mid, to, saturate, rm)
}

// ---------------------------------------------------------------------------------------------
// The conversion entry point.

/// Cast `x` to `to`. `saturate` only matters for float8 targets, `rm` only for E8M0.
pub(crate) fn cast_tensor(x: &Tensor, to: DType, saturate: bool, rm: RoundMode) -> Result<Tensor> {
    let from = x.dtype();
    if from == to {
        return Ok(x.clone());
    }
    match from {
        DType::String => return from_strings(x, to, saturate, rm),
        DType::F8E4M3FN
        | DType::F8E4M3FNUZ
        | DType::F8E5M2
        | DType::F8E5M2FNUZ
        | DType::F4E2M1
        | DType::F8E8M0 => return cast_tensor(&decode_small_float(x)?, to, saturate, rm),
        DType::I4 | DType::I2 => return cast_tensor(&reinterpret(x, DType::I8)?, to, saturate, rm),
        DType::U4 | DType::U2 => return cast_tensor(&reinterpret(x, DType::U8)?, to, saturate, rm),
        DType::Complex64 | DType::Complex128 => {
            return Err(Error::DType(format!("cannot cast from {from}")))
        }
        _ => {}
    }
    match to {
        DType::String => to_strings(x),
        DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F4E2M1 => {
            let f = F8Format::of(to).unwrap();
            let wide = cast_tensor(x, DType::F64, saturate, rm)?;
            let mut out = Tensor::zeros(to, x.shape());
            par_map(wide.view::<f64>()?, out.view_mut::<u8>()?, |v| f8_encode(v, &f, saturate));
            Ok(out)
        }
        DType::F8E8M0 => {
            let narrow = cast_tensor(x, DType::F32, saturate, rm)?;
            let mut out = Tensor::zeros(to, x.shape());
            par_map(narrow.view::<f32>()?, out.view_mut::<u8>()?, |v| e8m0_encode(v, saturate, rm));
            Ok(out)
        }
        DType::I4 | DType::U4 | DType::I2 | DType::U2 => {
            // Like wider integers, 4-bit and 2-bit targets keep the low bits (two's complement).
            let wide = cast_tensor(x, DType::I64, saturate, rm)?;
            let mut out = Tensor::zeros(to, x.shape());
            let bits = sub_byte_int_bits(to);
            let (mask, sign) = ((1i64 << bits) - 1, 1i64 << (bits - 1));
            if to.is_signed_int() {
                let wrap = |v: i64| (((v & mask) ^ sign) - sign) as i8;
                par_map(wide.view::<i64>()?, out.view_mut::<i8>()?, wrap);
            } else {
                par_map(wide.view::<i64>()?, out.view_mut::<u8>()?, |v| (v & mask) as u8);
            }
            Ok(out)
        }
        DType::Complex64 | DType::Complex128 => Err(Error::DType(format!("cannot cast to {to}"))),
        _ => convert_plain(x, to),
    }
}

// ---------------------------------------------------------------------------------------------
// Reinterpretation.

/// The unsigned integer dtype with the same element size as `dt` (for ops that only move bits).
pub(crate) fn raw_dtype(dt: DType) -> Result<DType> {
    match dt {
        DType::String | DType::Complex128 => Err(Error::DType(format!("no raw view of {dt}"))),
        d => Ok(match d.size() {
            1 => DType::U8,
            2 => DType::U16,
            4 => DType::U32,
            _ => DType::U64,
        }),
    }
}

/// The same bytes viewed as another dtype of the same element size (no copy).
pub(crate) fn reinterpret(t: &Tensor, dt: DType) -> Result<Tensor> {
    if t.dtype() == dt {
        return Ok(t.clone());
    }
    let buf = t
        .buffer()
        .ok_or_else(|| Error::DType(format!("cannot reinterpret a {} tensor", t.dtype())))?;
    if dt == DType::String || dt.size() != t.dtype().size() {
        return Err(Error::DType(format!("cannot reinterpret {} as {dt}", t.dtype())));
    }
    Tensor::from_buffer(dt, t.shape(), buf.clone())
}

/// Bit width of the 4-bit and 2-bit integer kinds (only called with one of them).
fn sub_byte_int_bits(dt: DType) -> u32 {
    if matches!(dt, DType::I2 | DType::U2) {
        2
    } else {
        4
    }
}

/// Bit width of the kinds held one element per byte but narrower than a byte.
fn sub_byte_bits(dt: DType) -> Option<u32> {
    match dt {
        DType::I4 | DType::U4 | DType::F4E2M1 => Some(4),
        DType::I2 | DType::U2 => Some(2),
        _ => None,
    }
}

/// BitCast: same bits, new dtype. Sub-byte kinds are held one per byte, so their codes are
/// re-extended (int4/int2 are sign-extended in memory); bytes cast to bool become `!= 0`.
fn bitcast_tensor(x: &Tensor, to: DType) -> Result<Tensor> {
    let from = x.dtype();
    let (fb, tb) = (sub_byte_bits(from), sub_byte_bits(to));
    let same_width = if fb.is_some() || tb.is_some() {
        fb == tb
    } else {
        from != DType::String && to != DType::String && from.size() == to.size()
    };
    if !same_width {
        return Err(Error::DType(format!("BitCast from {from} to {to}: bit widths differ")));
    }
    if let Some(bits) = fb {
        let mask = (1u8 << bits) - 1;
        // The in-memory byte of a signed kind is sign-extended; masking recovers the code.
        let codes: Vec<u8> = x.bytes().iter().map(|&v| v & mask).collect();
        return if to.is_signed_int() {
            let sign = 1i8 << (bits - 1);
            let v: Vec<i8> = codes.iter().map(|&c| ((c as i8) ^ sign) - sign).collect();
            Tensor::from_slice_as(to, x.shape(), &v)
        } else {
            Tensor::from_slice_as(to, x.shape(), &codes)
        };
    }
    if to == DType::Bool && from != DType::Bool {
        let mut out = Tensor::zeros(to, x.shape());
        par_map(x.bytes(), out.view_mut::<bool>()?, |b| b != 0);
        return Ok(out);
    }
    reinterpret(x, to)
}

// ---------------------------------------------------------------------------------------------
// Kernels.

fn cast_attrs(ctx: &OpCtx) -> Result<(bool, RoundMode)> {
    let saturate = ctx.opset() < 19 || ctx.attr_i("saturate", 1) != 0;
    let rm = RoundMode::parse(&ctx.attr_s("round_mode", "up"))?;
    Ok((saturate, rm))
}

fn cast(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let code = ctx.attr_i_opt("to").ok_or_else(|| ctx.unsupported("missing attribute 'to'"))?;
    let to = DType::from_onnx(code as i32)
        .ok_or_else(|| ctx.unsupported(format!("target dtype {code}")))?;
    let (saturate, rm) = cast_attrs(ctx)?;
    Ok(vec![cast_tensor(x, to, saturate, rm)?])
}

fn cast_like(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let to = ctx.input(inputs, 1)?.dtype();
    let (saturate, rm) = cast_attrs(ctx)?;
    Ok(vec![cast_tensor(x, to, saturate, rm)?])
}

fn bitcast(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let code = ctx.attr_i_opt("to").ok_or_else(|| ctx.unsupported("missing attribute 'to'"))?;
    let to = DType::from_onnx(code as i32)
        .ok_or_else(|| ctx.unsupported(format!("target dtype {code}")))?;
    Ok(vec![bitcast_tensor(x, to)?])
}

pub fn register(r: &mut Registry) {
    r.add("Cast", cast);
    r.add("CastLike", cast_like);
    r.add("BitCast", bitcast);
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::testing::*;
    use super::*;

    fn cast_codes(v: &[f32], to: DType, saturate: bool) -> Vec<u8> {
        let x = Tensor::from_vec(&[v.len()], v.to_vec()).unwrap();
        let out = run("Cast", 21, vec![ai("to", to as i64), ai("saturate", saturate as i64)], vec![Some(x)]).unwrap();
        assert_eq!(out.dtype(), to);
        out.view::<u8>().unwrap().to_vec()
    }

    // Inputs and expected codes from the ONNX node suite (test_cast_*FLOAT_to_FLOAT8*).
    const F8_IN: [f32; 15] = [
        0.478_925_47, 0.480_336_67, 0.499_684_87, 0.819_105_45, 0.470_312_48, 0.722_903_8, 1e6, 1e-7,
        f32::NAN, f32::INFINITY, f32::INFINITY, f32::NEG_INFINITY, -1e-7, 1e-7, -1e6,
    ];

    #[test]
    fn float8_encodings_match_reference() {
        let e = |to, sat| cast_codes(&F8_IN, to, sat);
        assert_eq!(e(DType::F8E4M3FN, true), [47, 47, 48, 53, 47, 52, 126, 0, 127, 126, 126, 254, 128, 0, 254]);
        assert_eq!(e(DType::F8E4M3FN, false), [47, 47, 48, 53, 47, 52, 127, 0, 127, 127, 127, 255, 128, 0, 255]);
        assert_eq!(e(DType::F8E5M2FNUZ, false), [60, 60, 60, 63, 60, 62, 128, 0, 128, 128, 128, 128, 0, 0, 128]);
        assert_eq!(e(DType::F8E5M2, true), [56, 56, 56, 59, 56, 58, 123, 0, 126, 123, 123, 251, 128, 0, 251]);
        let f4_in = [0.48, 0.25, 1.05, -3.5, -8.0, 9.0, 1e6, 1e-7, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -4.0, 0.01, -0.0];
        assert_eq!(cast_codes(&f4_in, DType::F4E2M1, true), [1, 0, 2, 14, 15, 7, 7, 0, 8, 7, 15, 14, 0, 8]);
    }

    #[test]
    fn float8_codes_round_trip() {
        for dt in [DType::F8E4M3FN, DType::F8E4M3FNUZ, DType::F8E5M2, DType::F8E5M2FNUZ, DType::F4E2M1] {
            let f = F8Format::of(dt).unwrap();
            let n = if dt == DType::F4E2M1 { 16 } else { 256 };
            for c in 0..n as u16 {
                let c = c as u8;
                let v = f8_decode(c, &f);
                if v.is_nan() || (f.uz && c == 0x80) {
                    continue;
                }
                assert_eq!(f8_encode(v as f64, &f, false), c, "{dt} code {c:#x} = {v}");
                // Halfway to the next code up rounds to the even one of the two.
                let next = f8_decode(c.wrapping_add(1), &f);
                if c as u16 + 1 < n && v >= 0.0 && next.is_finite() && next > v {
                    let mid = (v as f64 + next as f64) / 2.0;
                    let even = if c % 2 == 0 { c } else { c + 1 };
                    assert_eq!(f8_encode(mid, &f, true), even, "{dt} midpoint above {c:#x}");
                }
            }
        }
    }

    #[test]
    fn e8m0() {
        let x = [0.0f32, 0.124, 0.25, 0.5, 1.1, 2.0, 4.0, 8.0];
        let x_t = Tensor::from_vec(&[8], x.to_vec()).unwrap();
        let attrs = vec![ai("to", DType::F8E8M0 as i64), ai("saturate", 1), as_("round_mode", "up")];
        let out = run("Cast", 25, attrs, vec![Some(x_t)]).unwrap();
        let back = cast_tensor(&out, DType::F32, true, RoundMode::Up).unwrap();
        let v = back.view::<f32>().unwrap();
        assert_eq!(&v[1..], &[0.125, 0.25, 0.5, 2.0, 2.0, 4.0, 8.0]);
        assert_eq!(v[0], 2f32.powi(-127));
        assert_eq!(e8m0_encode(3.0, true, RoundMode::Down), 128);
        assert_eq!(e8m0_encode(3.0, true, RoundMode::Nearest), 129);
        assert_eq!(e8m0_encode(f32::MAX, true, RoundMode::Up), 254);
        assert_eq!(e8m0_encode(f32::MAX, false, RoundMode::Up), 255);
    }

    #[test]
    fn ints_wrap_and_floats_truncate() {
        let x = Tensor::from_vec(&[6], vec![-9.0f32, -8.5, 7.9, 8.0, 300.0, -300.0]).unwrap();
        let i4 = cast_tensor(&x, DType::I4, true, RoundMode::Up).unwrap();
        assert_eq!(i4.view::<i8>().unwrap(), &[7, -8, 7, -8, -4, 4]);
        let u4 = cast_tensor(&x, DType::U4, true, RoundMode::Up).unwrap();
        assert_eq!(u4.view::<u8>().unwrap(), &[7, 8, 7, 8, 12, 4]);
        let i8_ = cast_tensor(&x, DType::I8, true, RoundMode::Up).unwrap();
        assert_eq!(i8_.view::<i8>().unwrap(), &[-9, -8, 7, 8, 44, -44]);
        let w = Tensor::from_vec(&[2], vec![200i16, -1]).unwrap();
        assert_eq!(cast_tensor(&w, DType::I8, true, RoundMode::Up).unwrap().view::<i8>().unwrap(), &[-56, -1]);
        assert_eq!(cast_tensor(&w, DType::U64, true, RoundMode::Up).unwrap().view::<u64>().unwrap(), &[200, u64::MAX]);
        let b = cast_tensor(&Tensor::from_vec(&[3], vec![0.0f32, -0.0, f32::NAN]).unwrap(), DType::Bool, true, RoundMode::Up).unwrap();
        assert_eq!(b.view::<bool>().unwrap(), &[false, false, true]);
        let bf = cast_tensor(&Tensor::from_vec(&[1], vec![f32::from_bits(0x3ef5_eeb0)]).unwrap(), DType::BF16, true, RoundMode::Up).unwrap();
        assert_eq!(bf.view::<bf16>().unwrap()[0].to_bits(), 0x3ef6);
        let i4 = cast_tensor(&i4, DType::F16, true, RoundMode::Up).unwrap();
        assert_eq!(i4.view::<f16>().unwrap()[0], f16::from_f32(7.0));
    }

    #[test]
    fn two_bit_ints_wrap_and_round_trip() {
        let x = Tensor::from_vec(&[6], vec![-3.0f32, -2.5, 1.9, 2.0, 5.0, -300.0]).unwrap();
        let i2 = cast_tensor(&x, DType::I2, true, RoundMode::Up).unwrap();
        assert_eq!((i2.dtype(), i2.view::<i8>().unwrap()), (DType::I2, &[1i8, -2, 1, -2, 1, 0][..]));
        let u2 = cast_tensor(&x, DType::U2, true, RoundMode::Up).unwrap();
        assert_eq!((u2.dtype(), u2.view::<u8>().unwrap()), (DType::U2, &[1u8, 2, 1, 2, 1, 0][..]));
        let back = cast_tensor(&i2, DType::F16, true, RoundMode::Up).unwrap();
        assert_eq!(back.view::<f16>().unwrap()[1], f16::from_f32(-2.0));
        let back = cast_tensor(&i2, DType::I8, true, RoundMode::Up).unwrap();
        assert_eq!(back.view::<i8>().unwrap(), &[1, -2, 1, -2, 1, 0]);
        let back = cast_tensor(&u2, DType::F32, true, RoundMode::Up).unwrap();
        assert_eq!(back.view::<f32>().unwrap(), &[1.0, 2.0, 1.0, 2.0, 1.0, 0.0]);
        // int2 -> uint2 keeps the two's-complement bits; int4 -> int2 keeps the low two.
        let u = cast_tensor(&Tensor::from_slice_as(DType::I2, &[2], &[-1i8, -2]).unwrap(), DType::U2, true, RoundMode::Up).unwrap();
        assert_eq!(u.view::<u8>().unwrap(), &[3, 2]);
        let i = cast_tensor(&Tensor::from_slice_as(DType::I4, &[2], &[7i8, -6]).unwrap(), DType::I2, true, RoundMode::Up).unwrap();
        assert_eq!(i.view::<i8>().unwrap(), &[-1, -2]);
        let u = Some(Tensor::from_slice_as(DType::U2, &[3], &[3u8, 2, 1]).unwrap());
        let out = run("BitCast", 26, vec![ai("to", DType::I2 as i64)], vec![u.clone()]).unwrap();
        assert_eq!(out.view::<i8>().unwrap(), &[-1, -2, 1]);
        assert!(run("BitCast", 26, vec![ai("to", DType::U4 as i64)], vec![u]).is_err());
    }

    #[test]
    fn strings() {
        let cases = [
            (1.5, "1.5"), (0.1f32 as f64, "0.1"), (1e-7f32 as f64, "1e-07"), (1e20, "1e+20"), (-0.0, "-0"),
            (3.0, "3"), (123456789.0, "1.2345679e+08"), (0.30000001192092896, "0.30000001"),
            (f64::NAN, "NaN"), (f64::NEG_INFINITY, "-INF"), (16777216.0, "16777216"), (0.0001, "0.0001"),
        ];
        for (v, s) in cases {
            assert_eq!(format_g(v, 8), s);
        }
        let s = Tensor::from_strings(&[7], ["1.5", "INF", "-inf", "+Inf", "nan", "1e-5", " 2 "].map(String::from).to_vec()).unwrap();
        let f = cast_tensor(&s, DType::F32, true, RoundMode::Up).unwrap();
        let v = f.view::<f32>().unwrap();
        assert_eq!((v[0], v[1], v[2], v[3], v[5], v[6]), (1.5, f32::INFINITY, f32::NEG_INFINITY, f32::INFINITY, 1e-5, 2.0));
        assert!(v[4].is_nan());
        let s = Tensor::from_strings(&[3], ["100.5", "-7", "1e3"].map(String::from).to_vec()).unwrap();
        assert_eq!(cast_tensor(&s, DType::I32, true, RoundMode::Up).unwrap().view::<i32>().unwrap(), &[100, -7, 1]);
        assert!(cast_tensor(&Tensor::from_strings(&[1], vec!["x".into()]).unwrap(), DType::F32, true, RoundMode::Up).is_err());
        let n = Tensor::from_vec(&[2], vec![-5i64, 7]).unwrap();
        assert_eq!(cast_tensor(&n, DType::String, true, RoundMode::Up).unwrap().strings().unwrap(), &["-5", "7"]);
        let b = Tensor::from_vec(&[2], vec![true, false]).unwrap();
        assert_eq!(cast_tensor(&b, DType::String, true, RoundMode::Up).unwrap().strings().unwrap(), &["1", "0"]);
    }

    #[test]
    fn cast_like_and_bitcast() {
        let x = Some(Tensor::from_vec(&[2], vec![1.0f32, -2.0]).unwrap());
        let like = Some(Tensor::zeros(DType::F16, &[0]));
        let out = run("CastLike", 21, vec![], vec![x.clone(), like]).unwrap();
        assert_eq!(out.view::<f16>().unwrap(), &[f16::from_f32(1.0), f16::from_f32(-2.0)]);
        let out = run("BitCast", 26, vec![ai("to", DType::I32 as i64)], vec![x]).unwrap();
        assert_eq!(out.view::<i32>().unwrap(), &[0x3f80_0000, 0xc000_0000u32 as i32]);
        let u = Some(Tensor::from_slice_as(DType::U4, &[2], &[15u8, 3]).unwrap());
        let out = run("BitCast", 26, vec![ai("to", DType::I4 as i64)], vec![u]).unwrap();
        assert_eq!(out.view::<i8>().unwrap(), &[-1, 3]);
        let b = Some(Tensor::from_vec(&[2], vec![2u8, 0]).unwrap());
        let out = run("BitCast", 26, vec![ai("to", DType::Bool as i64)], vec![b.clone()]).unwrap();
        assert_eq!(out.view::<bool>().unwrap(), &[true, false]);
        assert!(run("BitCast", 26, vec![ai("to", DType::F16 as i64)], vec![b]).is_err());
    }
}
