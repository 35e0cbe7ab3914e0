//! The GEMM epilogue: per-column bias and an activation, applied to a C tile right after its last
//! K block while it is still in L1.
//!
//! The math is branch-free scalar code (selects, min/max, bit casts, Horner polynomials without
//! fused multiply-adds) so that the loops auto-vectorize inside the per-ISA `#[target_feature]`
//! wrappers below. Polynomial coefficients are our own weighted least-squares fits (relative error
//! of the fit: exp 2e-9, erf 1e-9 / 4e-8 / 3e-8 per range).

use crate::cpu::isa::Isa;

/// An elementwise function applied after the product (and bias).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    None,
    Relu,
    /// Clamp to [min, max].
    Clip(f32, f32),
    /// x < 0 ? alpha·x : x.
    LeakyRelu(f32),
    Sigmoid,
    /// max(0, min(1, alpha·x + beta)).
    HardSigmoid(f32, f32),
    /// x · max(0, min(1, x/6 + 1/2)).
    HardSwish,
    /// x · sigmoid(x).
    Silu,
    Tanh,
    /// x/2 · (1 + erf(x/√2)).
    GeluErf,
    /// x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³))).
    GeluTanh,
}

/// What happens to C after `alpha·A·B (+ C)`: `act(c + bias[j])`.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    /// Scale of the product (ONNX Gemm's alpha); 1 for plain products.
    pub alpha: f32,
    /// One value per output column.
    pub bias: Option<&'a [f32]>,
    pub act: Act,
}

impl Default for Epilogue<'_> {
    fn default() -> Self {
        Epilogue::NONE
    }
}

impl<'a> Epilogue<'a> {
    pub const NONE: Epilogue<'static> = Epilogue { alpha: 1.0, bias: None, act: Act::None };

    pub fn new(bias: Option<&'a [f32]>, act: Act) -> Self {
        Epilogue { alpha: 1.0, bias, act }
    }

    /// Whether anything is left to do after the product.
    pub(crate) fn is_identity(&self) -> bool {
        self.bias.is_none() && self.act == Act::None
    }
}

/// Apply bias (columns `j0..j0+row.len()`) and activation to `rows` rows of C starting at `c`.
///
/// # Safety
/// `c` points at `rows` rows of at least `n` writable floats, `ldc` apart; `isa` is supported.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn apply(isa: Isa, c: *mut f32, ldc: usize, rows: usize, n: usize, j0: usize, epi: &Epilogue) {
    if epi.is_identity() {
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => apply_avx512(c, ldc, rows, n, j0, epi),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => apply_avx2(c, ldc, rows, n, j0, epi),
        _ => apply_rows::<false>(c, ldc, rows, n, j0, epi),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn apply_avx512(c: *mut f32, ldc: usize, rows: usize, n: usize, j0: usize, epi: &Epilogue) {
    apply_rows::<true>(c, ldc, rows, n, j0, epi)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_avx2(c: *mut f32, ldc: usize, rows: usize, n: usize, j0: usize, epi: &Epilogue) {
    apply_rows::<true>(c, ldc, rows, n, j0, epi)
}

#[inline(always)]
unsafe fn apply_rows<const F: bool>(c: *mut f32, ldc: usize, rows: usize, n: usize, j0: usize, epi: &Epilogue) {
    for i in 0..rows {
        let row = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
        if let Some(b) = epi.bias {
            for (x, &bv) in row.iter_mut().zip(&b[j0..j0 + n]) {
                *x += bv;
            }
        }
        apply_act_with::<F>(row, epi.act);
    }
}

/// The activation over a slice (the match is outside the loops so each loop vectorizes; plain `for`
/// loops, because a `for_each` closure is a function of its own that may stay out of line and so
/// lose the caller's `#[target_feature]`s).
#[inline(always)]
pub(crate) fn apply_act(row: &mut [f32], act: Act) {
    apply_act_with::<false>(row, act)
}

/// [`apply_act`] with fused multiply-adds in the polynomials, for callers already running under an
/// ISA with FMA (`with_isa_of(Isa::Avx2Fma | Isa::Avx512, ..)`): elsewhere it is correct but slow.
#[inline(always)]
pub(crate) fn apply_act_fma(row: &mut [f32], act: Act) {
    apply_act_with::<true>(row, act)
}

/// [`apply_act`] with fused multiply-adds in the polynomials when `F` (only inside functions
/// compiled with FMA: elsewhere `mul_add` is a libm call).
#[inline(always)]
fn apply_act_with<const F: bool>(row: &mut [f32], act: Act) {
    match act {
        Act::None => {}
        Act::Relu => for x in row.iter_mut() {
            *x = relu(*x);
        },
        Act::Clip(lo, hi) => for x in row.iter_mut() {
            *x = clip(*x, lo, hi);
        },
        Act::LeakyRelu(a) => for x in row.iter_mut() {
            *x = leaky_relu(*x, a);
        },
        Act::Sigmoid => for x in row.iter_mut() {
            *x = sigmoid::<F>(*x);
        },
        Act::HardSigmoid(a, b) => for x in row.iter_mut() {
            *x = hard_sigmoid(*x, a, b);
        },
        Act::HardSwish => for x in row.iter_mut() {
            *x = *x * hard_sigmoid(*x, 1.0 / 6.0, 0.5);
        },
        Act::Silu => for x in row.iter_mut() {
            *x = *x * sigmoid::<F>(*x);
        },
        Act::Tanh => for x in row.iter_mut() {
            *x = tanh::<F>(*x);
        },
        Act::GeluErf => for x in row.iter_mut() {
            *x = gelu_erf::<F>(*x);
        },
        Act::GeluTanh => for x in row.iter_mut() {
            *x = gelu_tanh::<F>(*x);
        },
    }
}

/// The activation of one value (for callers outside GEMM and for tests).
pub fn act_scalar(x: f32, act: Act) -> f32 {
    let mut v = [x];
    apply_act(&mut v, act);
    v[0]
}

// Selects (not min/max) so NaN stays NaN, as ONNX's reference does.
#[inline(always)]
fn relu(x: f32) -> f32 {
    if x < 0.0 {
        0.0
    } else {
        x
    }
}

#[inline(always)]
fn clip(x: f32, lo: f32, hi: f32) -> f32 {
    let y = if x < lo { lo } else { x };
    if y > hi {
        hi
    } else {
        y
    }
}

#[inline(always)]
fn leaky_relu(x: f32, a: f32) -> f32 {
    if x < 0.0 {
        a * x
    } else {
        x
    }
}

#[inline(always)]
fn hard_sigmoid(x: f32, a: f32, b: f32) -> f32 {
    clip(a * x + b, 0.0, 1.0)
}

#[inline(always)]
fn sigmoid<const F: bool>(x: f32) -> f32 {
    1.0 / (1.0 + exp_with::<F>(-x))
}

/// tanh without a libm call (so it vectorizes): an odd polynomial near 0, where 1 − 2/(e^{2|x|}+1)
/// would cancel, and that form elsewhere. Relative error below 4e-7 (mostly from exp).
#[inline(always)]
pub(crate) fn tanh<const F: bool>(x: f32) -> f32 {
    let a = x.abs();
    let u = x * x;
    let small = x + x * u * poly::<F, 6>(u, &[
        -0.333_333_310_100_489_33,
        0.133_332_124_877_297_8,
        -0.053_947_452_285_078_92,
        0.021_703_989_529_995_454,
        -0.008_184_633_580_376_091,
        0.002_148_957_376_012_682_7,
    ]);
    let large = 1.0 - 2.0 / (exp_with::<F>(2.0 * a) + 1.0);
    let large = if x < 0.0 { -large } else { large };
    if a < 0.625 {
        small
    } else {
        large
    }
}

#[inline(always)]
fn gelu_tanh<const F: bool>(x: f32) -> f32 {
    // x/2·(1 + tanh(u)) = x·sigmoid(2u): no cancellation for either sign.
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = K * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_with::<F>(-2.0 * u))
}

#[inline(always)]
fn gelu_erf<const F: bool>(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    0.5 * x * one_plus_erf::<F>(z)
}

/// exp(x) for f32: x = n·ln2 + r, |r| ≤ ln2/2, exp(r) by a degree-6 polynomial, 2^n by the exponent
/// bits. Inputs are clamped to the finite range (below ≈ -87.3 the result is ≈ 1e-38, not 0).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

#[inline(always)]
fn exp_with<const F: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = clip(x, -87.33, 88.7);
    // Round to nearest by the 1.5·2^23 trick (SSE2 has no rounding instruction; no libm call).
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = poly::<F, 7>(r, &[
        1.000_000_000_554_583_3,
        1.000_000_036_339_214_7,
        0.499_999_920_749_391_37,
        0.166_664_200_966_463_4,
        0.041_668_226_328_968_85,
        0.008_374_822_003_416_993,
        0.001_383_682_210_778_639_1,
    ]);
    // n + 127 ∈ [1, 255) after the clamp, so the scale is a normal power of two; splitting it in two
    // halves keeps n = 128 (x near 88.7) representable.
    // n as an integer straight from t's mantissa bits: `n as i32` is a saturating cast that LLVM
    // scalarizes (cvttss2si + NaN/overflow cmovs per lane), which made this function 8x slower.
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let h = ni >> 1;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - h + 127) as u32) << 23);
    p * s1 * s2
}

/// 1 + erf(z), accurate also where it is tiny (z ≪ 0, the GELU tail).
#[inline(always)]
fn one_plus_erf<const F: bool>(z: f32) -> f32 {
    let a = z.abs();
    // |z| < 1: erf(z) = z·P(z²).
    let small = 1.0 + z * erf_small::<F>(a * a);
    // |z| ≥ 1: erfc(|z|) = exp(-z²)·G(|z|).
    let c = erfc_large::<F>(a);
    let large = if z < 0.0 { c } else { 2.0 - c };
    if a < 1.0 {
        small
    } else {
        large
    }
}

/// erf(x) with relative error near 1e-7.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let r = if a < 1.0 { a * erf_small::<false>(a * a) } else { 1.0 - erfc_large::<false>(a) };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

#[inline(always)]
fn erf_small<const F: bool>(u: f32) -> f32 {
    poly::<F, 7>(u, &[
        1.128_379_165_726_632_4,
        -0.376_126_258_236_892_2,
        0.112_835_851_424_380_55,
        -0.026_853_811_676_920_886,
        0.005_188_327_194_884_129,
        -0.000_801_018_931_374_034,
        7.853_847_119_917_99e-5,
    ])
}

/// erfc(a) for a ≥ 1 (any value for a < 1, unused there).
#[inline(always)]
fn erfc_large<const F: bool>(a: f32) -> f32 {
    // 1 ≤ a < 4: exp(a²)·erfc(a) as one polynomial in a − 2.5 (Chebyshev fit, relative error
    // 2.3e-7 in f32). No division, one polynomial: this runs in every GELU epilogue.
    let g = poly::<F, 12>(a - 2.5, &[
        0.210_806_359_566_864_4,
        -0.074_347_339_394_793_47,
        0.024_938_151_162_282_655,
        -0.008_001_666_864_369_41,
        0.002_466_193_997_014_184,
        -0.000_733_228_462_969_417_3,
        0.000_212_679_211_699_194_1,
        -5.943_838_316_239_309e-5,
        1.451_685_161_808_418e-5,
        -3.788_423_946_388_166_2e-6,
        1.640_311_602_115_704_4e-6,
        -4.192_785_929_303_613e-7,
    ]);
    // a ≥ 4: erfc(a) < 1.6e-8, below f32's resolution of erf near 1 and, in GELU, an output below
    // 5e-8 in magnitude. Returning exactly 0 also keeps subnormals (slow) out of the epilogue.
    if a < 4.0 {
        exp_with::<F>(-(a * a)) * g
    } else {
        0.0
    }
}

/// Horner's rule, lowest coefficient first (plain multiply-add: no libm call on non-FMA targets).
#[inline(always)]
fn poly<const F: bool, const N: usize>(x: f32, c: &[f64; N]) -> f32 {
    let mut acc = c[N - 1] as f32;
    for i in (0..N - 1).rev() {
        acc = if F { acc.mul_add(x, c[i] as f32) } else { acc * x + c[i] as f32 };
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f32, b: f64) -> f64 {
        ((a as f64 - b).abs()) / b.abs().max(1e-30)
    }

    #[test]
    fn exp_accuracy() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst = worst.max(rel(exp(x), (x as f64).exp()));
            x += 0.0137;
        }
        assert!(worst < 3e-7, "exp worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn tanh_accuracy() {
        tanh_accuracy_with::<false>();
        // The fused-multiply-add polynomials (libm fmaf here, the instruction inside kernels).
        tanh_accuracy_with::<true>();
    }

    fn tanh_accuracy_with<const F: bool>() {
        let tanh = tanh::<F>;
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = (x as f64).tanh();
            if want != 0.0 {
                worst = worst.max(rel(tanh(x), want));
            }
            x += 0.000_913;
        }
        assert!(worst < 4e-7, "tanh worst relative error {worst}");
        for &x in &[1e-30f32, 1e-8, -1e-4, 0.624_999, 0.625, -0.625] {
            assert!(rel(tanh(x), (x as f64).tanh()) < 4e-7, "{x}");
        }
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert_eq!(tanh(100.0), 1.0);
        assert!(tanh(f32::NAN).is_nan());
        let mut e = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            e = e.max(rel(exp_with::<F>(x), (x as f64).exp()));
            x += 0.0137;
        }
        assert!(e < 3e-7, "exp worst relative error {e}");
    }

    #[test]
    fn erf_accuracy() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            worst = worst.max(rel(erf(x), libm::erf(x as f64)));
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "erf worst relative error {worst}");
        for &x in &[1e-30f32, 1e-8, 1e-3] {
            assert!(rel(erf(x), libm::erf(x as f64)) < 1e-7);
        }
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn gelu_tail_relative() {
        // 1 + erf(z) for negative z must stay accurate where erf(z) ≈ -1, down to z = -4
        // (x ≈ -5.66); below, GELU is exactly 0, within 5e-8 of the true value.
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x < 8.0 {
            let xd = x as f64;
            let want = 0.5 * xd * libm::erfc(-xd / std::f64::consts::SQRT_2);
            for got in [gelu_erf::<false>(x), gelu_erf::<true>(x)] {
                if xd / std::f64::consts::SQRT_2 > -3.999 {
                    worst = worst.max(rel(got, want));
                } else if xd / std::f64::consts::SQRT_2 < -4.001 {
                    assert_eq!(got, 0.0, "gelu({x})");
                    assert!(want.abs() < 5e-8, "gelu({x}) = {want}");
                }
            }
            x += 0.001_3;
        }
        assert!(worst < 2e-5, "gelu worst relative error {worst}");
    }

    #[test]
    fn simple_acts() {
        assert_eq!(act_scalar(-2.0, Act::Relu), 0.0);
        assert_eq!(act_scalar(3.0, Act::Relu), 3.0);
        assert!(act_scalar(f32::NAN, Act::Relu).is_nan());
        assert_eq!(act_scalar(7.0, Act::Clip(-1.0, 6.0)), 6.0);
        assert_eq!(act_scalar(-7.0, Act::Clip(-1.0, 6.0)), -1.0);
        assert_eq!(act_scalar(-2.0, Act::LeakyRelu(0.1)), -0.2);
        assert_eq!(act_scalar(0.0, Act::HardSigmoid(0.2, 0.5)), 0.5);
        assert_eq!(act_scalar(4.0, Act::HardSwish), 4.0);
        assert_eq!(act_scalar(-4.0, Act::HardSwish), -0.0);
        assert!((act_scalar(1.0, Act::HardSwish) - 1.0 * (1.0 / 6.0 + 0.5)).abs() < 1e-7);
        assert!((act_scalar(0.0, Act::Sigmoid) - 0.5).abs() < 1e-7);
        assert!((act_scalar(2.0, Act::Silu) - 2.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
        let gt = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
        for &x in &[-5.0f32, -1.0, -0.1, 0.0, 0.3, 2.0, 9.0] {
            let got = act_scalar(x, Act::GeluTanh) as f64;
            assert!((got - gt(x as f64)).abs() <= 1e-7 + 1e-6 * gt(x as f64).abs(), "{x}: {got}");
        }
        assert_eq!(act_scalar(-200.0, Act::Sigmoid), 0.0f32.max(act_scalar(-200.0, Act::Sigmoid)));
        assert!(act_scalar(-200.0, Act::Sigmoid) < 1e-37);
        assert_eq!(act_scalar(200.0, Act::Sigmoid), 1.0);
    }
}
