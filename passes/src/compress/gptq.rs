//! GPTQ rounding of int8 weights (Frantar et al., 2022): weights are rounded one input row at a
//! time, and each row's rounding error is pushed onto the rows not yet rounded, weighted by the
//! inverse of the layer's input second-moment matrix H = XᵀX/rows (from the calibration set).
//! The product X·W then keeps far closer to float than with each weight rounded to nearest,
//! which matters on models where weight rounding alone moves the outputs (PP-OCRv4 rec).
//!
//! Used by `quant_int8` for static int8 (the per-column scales stay those of plain rounding,
//! largest |w| / 127, so the result is a drop-in for `qgemm::quantize_weights`) and by
//! `quant_int4` for `--int4-method gptq` (block scales chosen as the blocks are reached).

use std::collections::HashMap;
use std::hash::Hash;

use kiln_backends::cpu::gemm::{self, BRef, Epilogue, MatRef};
use kiln_backends::cpu::kernels::int4::{self, Int4Format, Int4Weight};
use kiln_backends::cpu::qgemm::{self, QWeights};
use kiln_compiler::ir::{Model, ValueId};
use kiln_runtime::{Result, Tensor};

use super::calibrate::{observe, Samples};

/// Input statistics of one layer: the second moments H = Σ xᵀx over the rows seen, K×K (f64,
/// symmetric), and the first moments Σ x (per input column, for bias correction).
#[derive(Clone, Debug)]
pub struct Hessian {
    pub k: usize,
    pub h: Vec<f64>,
    pub rows: u64,
    pub sum: Vec<f64>,
}

/// GPTQ is skipped (plain rounding) above this K: H is K×K and its inverse costs K³.
pub const MAX_K: usize = 4096;

/// Dampening added to H's diagonal, relative to its mean. GPTQ's default is 1%, for thousands
/// of calibration rows per layer; calibration sets here are small (MiniLM's 32 sentences give
/// ~600 rows against K up to 1536), so H is noisy and 1% let GPTQ fit those rows: on MiniLM
/// int4, held-out cosine 0.9883 at 1%, 0.9912 at 10%, 0.9914 at 30%; int8 changed little.
const DAMP: f64 = 0.1;

impl Hessian {
    pub fn new(k: usize) -> Hessian {
        Hessian { k, h: vec![0.0; k * k], rows: 0, sum: vec![0.0; k] }
    }

    /// Mean of each input column over the rows seen.
    pub fn mean(&self) -> Vec<f64> {
        let n = self.rows.max(1) as f64;
        self.sum.iter().map(|s| s / n).collect()
    }

    /// Add the rows of a row-major `[m, k]` matrix: XᵀX through the f32 GEMM (one sample's rows
    /// at a time, so f32 sums stay short), accumulated in f64.
    pub fn add_rows(&mut self, x: &[f32]) -> Result<()> {
        let k = self.k;
        let m = x.len() / k.max(1);
        if m == 0 {
            return Ok(());
        }
        let mut g = vec![0f32; k * k];
        gemm::sgemm(k, k, m, MatRef::cols(x, k), BRef::Mat(MatRef::rows(x, k)), &mut g, k, false, &Epilogue::NONE, true)?;
        for (h, v) in self.h.iter_mut().zip(&g) {
            *h += *v as f64;
        }
        for row in x.chunks_exact(k) {
            for (s, v) in self.sum.iter_mut().zip(row) {
                *s += *v as f64;
            }
        }
        self.rows += m as u64;
        Ok(())
    }

    /// The full symmetric matrix scaled by 1/rows, with each row/column i multiplied by
    /// `mul[i % period]` (the smoothing the kernel applies to the input).
    fn finish(&self, mul: Option<&[f32]>, period: usize) -> Vec<f64> {
        let k = self.k;
        let n = self.rows.max(1) as f64;
        let f = |i: usize| mul.and_then(|m| m.get(i % period)).map_or(1.0, |&v| v as f64);
        let mut h = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] = self.h[i * k + j] / n * f(i) * f(j);
            }
        }
        h
    }
}

/// Σ a·b with eight independent partial sums, so that it vectorises (a single f64 accumulator
/// would chain every addition: the factorisations are K³ of these).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// In-place Cholesky factorisation of a symmetric positive definite K×K matrix into its lower
/// factor L (A = L·Lᵀ). False if it is not positive definite.
fn cholesky(a: &mut [f64], k: usize) -> bool {
    for j in 0..k {
        let d = a[j * k + j] - dot(&a[j * k..j * k + j], &a[j * k..j * k + j]);
        if !(d > 0.0) {
            return false;
        }
        let d = d.sqrt();
        a[j * k + j] = d;
        for i in j + 1..k {
            let s = a[i * k + j] - dot(&a[i * k..i * k + j], &a[j * k..j * k + j]);
            a[i * k + j] = s / d;
        }
        for p in j + 1..k {
            a[j * k + p] = 0.0;
        }
    }
    true
}

/// The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), which GPTQ's row-by-row updates read.
///
/// With J the order-reversing permutation, Cholesky of JHJ = L·Lᵀ gives H = (JLJ)(JLJ)ᵀ with
/// JLJ upper triangular, so U = (JLJ)⁻¹ = J·L⁻¹·J: one factorisation and one triangular
/// inverse, both reading rows contiguously.
fn inverse_upper_factor(h: Vec<f64>, k: usize) -> Option<Vec<f64>> {
    let mut r = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..k {
            r[(k - 1 - i) * k + (k - 1 - j)] = h[i * k + j];
        }
    }
    if !cholesky(&mut r, k) {
        return None;
    }
    // M = L⁻¹ (lower), row by row: M[i][c] = -(Σ_{p in c..i} L[i][p]·M[p][c]) / L[i][i]. Kept
    // transposed (mt[c][p] = M[p][c]) so that the sum runs over contiguous memory.
    let mut mt = vec![0f64; k * k];
    for i in 0..k {
        let d = r[i * k + i];
        mt[i * k + i] = 1.0 / d;
        let li = &r[i * k..i * k + i];
        for c in 0..i {
            let col = &mt[c * k + c..c * k + i];
            let s = dot(&li[c..], col);
            mt[c * k + i] = -s / d;
        }
    }
    // U[i][j] = M[k-1-i][k-1-j] = mt[k-1-j][k-1-i].
    let mut u = vec![0f64; k * k];
    for i in 0..k {
        for j in i..k {
            u[i * k + j] = mt[(k - 1 - j) * k + (k - 1 - i)];
        }
    }
    Some(u)
}

/// One layer whose statistics `hessians` gathers: its id, the value it reads, and its K.
pub struct Watch<L> {
    pub layer: L,
    pub x: ValueId,
    pub k: usize,
}

/// Input statistics of each watched layer (K at most `MAX_K`), from running the float model on
/// the calibration samples: `rows(i, x)` builds layer i's GEMM input rows from a tensor of its
/// value (None: it does not fit, skipped).
pub fn hessians<L: Copy + Eq + Hash>(
    model: &Model,
    samples: &Samples,
    layers: &[Watch<L>],
    rows: impl Fn(usize, &Tensor) -> Option<Vec<f32>>,
) -> Result<HashMap<L, Hessian>> {
    let mut watch: Vec<ValueId> = layers.iter().filter(|l| l.k <= MAX_K).map(|l| l.x).collect();
    watch.sort_unstable();
    watch.dedup();
    let mut hess: HashMap<L, Hessian> = HashMap::new();
    let mut failed = None;
    observe(model, samples, &watch, &mut |_, v, t| {
        for (i, l) in layers.iter().enumerate().filter(|(_, l)| l.x == v && l.k <= MAX_K) {
            if let Some(r) = rows(i, t) {
                if let Err(e) = hess.entry(l.layer).or_insert_with(|| Hessian::new(l.k)).add_rows(&r) {
                    failed.get_or_insert(e);
                }
            }
        }
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(hess),
    }
}

/// Up to `max` rows, evenly spread, of a row-major `[m, k]` matrix (the inputs of a MatMul).
pub fn sample_rows(x: &[f32], k: usize, max: usize) -> Vec<f32> {
    let m = x.len() / k.max(1);
    let step = m.div_ceil(max.max(1)).max(1);
    (0..m).step_by(step).flat_map(|r| x[r * k..(r + 1) * k].iter().copied()).collect()
}

/// Bias correction (Nagel et al., "Data-Free Quantization", 2019): `bias` (zero if None) less
/// the mean shift that rounding the row-major K×N weights `w` to `deq` (dequantized, same
/// domain) brings to each output column on the calibration inputs, Σ_k (deq_kj − w_kj)·E[x_k].
/// Rounding errors that lean one way over a layer's inputs do not average out; left in, they
/// pile up through the following layers (on PP-OCRv4 rec int8, two layers' shifts cancelled
/// while both were int8, and keeping either one float made the model worse). Only the weights'
/// error is corrected, not the input quantization's: its mean on the calibration set is
/// dominated by the clipped outliers of a few rows, and taking it off every row made MiniLM
/// int8 (cosine 0.9989 → 0.9964) and rec worse. None when `hess` does not match.
pub fn corrected_bias(bias: Option<&[f32]>, w: &[f32], deq: &[f32], n: usize, hess: &Hessian) -> Option<Vec<f32>> {
    let k = hess.k;
    if hess.rows == 0 || w.len() != k * n || deq.len() != k * n || bias.is_some_and(|b| b.len() != n) {
        return None;
    }
    let mean = hess.mean();
    let mut shift = vec![0f64; n];
    for (r, m) in mean.iter().enumerate() {
        for ((sh, &q), &v) in shift.iter_mut().zip(&deq[r * n..(r + 1) * n]).zip(&w[r * n..(r + 1) * n]) {
            *sh += (q as f64 - v as f64) * m;
        }
    }
    Some((0..n).map(|j| (bias.map_or(0.0, |b| b[j]) as f64 - shift[j]) as f32).collect())
}

/// Whether GPTQ applies to a `k`×`n` weight `w` with statistics `hess`.
fn applies(w: &[f32], k: usize, n: usize, hess: &Hessian) -> bool {
    hess.k == k && k <= MAX_K && hess.rows > 0 && w.len() == k * n
}

/// The weights in f64 with row r divided by `mul[r % period]` (the input smoothing, by which
/// H's row and column r are multiplied), H damped, and the upper factor of H⁻¹: what GPTQ's
/// loop needs. None when GPTQ does not apply or H cannot be factored.
fn prepare(w: &[f32], k: usize, n: usize, hess: &Hessian, mul: Option<&[f32]>, period: usize) -> Option<(Vec<f64>, Vec<f64>)> {
    if !applies(w, k, n, hess) {
        return None;
    }
    let mut h = hess.finish(mul, period);
    let mut wf: Vec<f64> = w
        .chunks_exact(n)
        .enumerate()
        .flat_map(|(r, row)| {
            let f = mul.and_then(|m| m.get(r % period)).map_or(1.0, |&v| 1.0 / v as f64);
            row.iter().map(move |&v| v as f64 * f)
        })
        .collect();
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    if !(mean_diag > 0.0) {
        return None;
    }
    for i in 0..k {
        // Inputs that were always zero carry no information: their weights are zeroed (as GPTQ).
        if h[i * k + i] == 0.0 {
            h[i * k + i] = 1.0;
            wf[i * n..(i + 1) * n].fill(0.0);
        }
        h[i * k + i] += DAMP * mean_diag;
    }
    let u = inverse_upper_factor(h, k)?;
    Some((wf, u))
}

/// GPTQ's loop: row r is rounded by `round_row(r, weights so far, dequantized row out)`, and its
/// error, divided by U[r][r], is taken off every later row i in proportion to U[r][i].
fn compensate(
    wf: &mut [f64],
    k: usize,
    n: usize,
    u: &[f64],
    mut round_row: impl FnMut(usize, &[f64], &mut [f64]) -> Result<()>,
) -> Result<()> {
    let (mut deq, mut err) = (vec![0f64; n], vec![0f64; n]);
    for r in 0..k {
        round_row(r, wf, &mut deq)?;
        let d = u[r * k + r];
        for ((e, &v), &q) in err.iter_mut().zip(&wf[r * n..(r + 1) * n]).zip(&deq) {
            *e = (v - q) / d;
        }
        for i in r + 1..k {
            let c = u[r * k + i];
            if c != 0.0 {
                for (x, e) in wf[i * n..(i + 1) * n].iter_mut().zip(&err) {
                    *x -= e * c;
                }
            }
        }
    }
    Ok(())
}

/// Quantize the row-major K×N weights `w` (rows = input channels, as the int8 GEMM reads them)
/// with GPTQ against the input statistics `hess`, when the kernel multiplies input row r by
/// `mul[r % period]` (smoothing: row r of `w` is divided by it here). None when GPTQ does not apply;
/// the caller then rounds to nearest. Per-column scales are those of rounding to nearest.
pub fn quantize(w: &[f32], k: usize, n: usize, hess: &Hessian, mul: Option<&[f32]>, period: usize) -> Option<Result<QWeights>> {
    let (mut wf, u) = prepare(w, k, n, hess, mul, period)?;
    let scale: Vec<f64> = (0..n)
        .map(|j| {
            let amax = (0..k).map(|r| wf[r * n + j].abs()).fold(0f64, f64::max);
            if amax > 0.0 { amax / 127.0 } else { 1.0 }
        })
        .collect();
    let mut q = vec![0i8; k * n];
    let run = compensate(&mut wf, k, n, &u, |r, wf, deq| {
        for j in 0..n {
            let qi = (wf[r * n + j] / scale[j]).round_ties_even().clamp(-127.0, 127.0);
            q[r * n + j] = qi as i8;
            deq[j] = qi * scale[j];
        }
        Ok(())
    });
    Some(run.map(|()| {
        let (packed, sum) = qgemm::pack_i8(&q, k, n);
        QWeights { k, n, packed, scale: scale.iter().map(|&s| s as f32).collect(), sum }
    }))
}

/// Block-wise int4 (`fmt`) with GPTQ. Block scales and zero points are chosen first, from the
/// weights as they are (`int4::round_matmul`'s clipped-range search), and the rows are then
/// rounded in order of decreasing input energy (H's diagonal, GPTQ's "act order"), so the
/// rows that matter most are rounded while the most rows remain to absorb their error.
/// None when GPTQ does not apply.
pub fn quantize_int4(w: &[f32], k: usize, n: usize, hess: &Hessian, fmt: &Int4Format) -> Option<Result<Int4Weight>> {
    if !applies(w, k, n, hess) {
        return None;
    }
    let params = match int4::round_matmul(w, k, n, fmt) {
        Ok((_, params)) => params,
        Err(e) => return Some(Err(e)),
    };
    // Permute rows (and H) into act order, run GPTQ there, and write codes back in place.
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| hess.h[b * k + b].total_cmp(&hess.h[a * k + a]));
    let mut ph = Hessian { k, h: vec![0.0; k * k], rows: hess.rows, sum: order.iter().map(|&o| hess.sum[o]).collect() };
    for (i, &oi) in order.iter().enumerate() {
        for (j, &oj) in order.iter().enumerate() {
            ph.h[i * k + j] = hess.h[oi * k + oj];
        }
    }
    let pw: Vec<f32> = order.iter().flat_map(|&o| w[o * n..(o + 1) * n].iter().copied()).collect();
    let (mut wf, u) = prepare(&pw, k, n, &ph, None, k)?;
    let mut codes = vec![0u8; k * n];
    let run = compensate(&mut wf, k, n, &u, |r, wf, deq| {
        let row = order[r];
        let b = row / fmt.block;
        for j in 0..n {
            let (s, z) = params[b * n + j];
            let c = int4::code(wf[r * n + j] as f32, if s != 0.0 { 1.0 / s } else { 0.0 }, z);
            codes[row * n + j] = c;
            deq[j] = (c as f64 - z as f64) * s as f64;
        }
        Ok(())
    });
    Some(run.and_then(|()| int4::pack_matmul(&codes, &params, k, n, fmt)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    #[test]
    fn upper_factor_inverts() {
        let k = 5;
        let mut r = lcg(3);
        let x: Vec<f32> = (0..40 * k).map(|_| r()).collect();
        let mut hs = Hessian::new(k);
        hs.add_rows(&x).unwrap();
        let h = hs.finish(None, k);
        let u = inverse_upper_factor(h.clone(), k).unwrap();
        // UᵀU · H = I
        for i in 0..k {
            for j in 0..k {
                let mut s = 0f64;
                for p in 0..k {
                    let inv_ip: f64 = (0..k).map(|q| u[q * k + i] * u[q * k + p]).sum();
                    s += inv_ip * h[p * k + j];
                }
                assert!((s - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9, "{i},{j}: {s}");
            }
        }
    }

    /// `m` rows of `k` correlated inputs (a few latent factors, so H is far from diagonal).
    fn correlated_rows(m: usize, k: usize, r: &mut impl FnMut() -> f32) -> Vec<f32> {
        let lat: Vec<f32> = (0..m * 4).map(|_| r()).collect();
        let mix: Vec<f32> = (0..4 * k).map(|_| r()).collect();
        (0..m * k).map(|i| (0..4).map(|f| lat[(i / k) * 4 + f] * mix[f * k + i % k]).sum::<f32>() + 0.05 * r()).collect()
    }

    /// Σ over the rows of x of |x·(W - Ŵ)|², W and Ŵ row-major `[k, n]`.
    fn product_error(x: &[f32], w: &[f32], wq: &[f32], k: usize, n: usize) -> f64 {
        let mut e = 0f64;
        for row in x.chunks_exact(k) {
            for j in 0..n {
                let d: f32 = (0..k).map(|p| row[p] * (w[p * n + j] - wq[p * n + j])).sum();
                e += (d as f64).powi(2);
            }
        }
        e
    }

    /// GPTQ's products X·Ŵ are closer to X·W than those of rounding to nearest, on the rows
    /// its statistics came from.
    #[test]
    fn gptq_beats_round_to_nearest_on_the_products() {
        let (m, k, n) = (256, 48, 8);
        let mut r = lcg(7);
        let x = correlated_rows(m, k, &mut r);
        let w: Vec<f32> = (0..k * n).map(|_| r()).collect();
        let mut hs = Hessian::new(k);
        hs.add_rows(&x).unwrap();
        let g = quantize(&w, k, n, &hs, None, k).unwrap().unwrap();
        let rtn = qgemm::quantize_weights(&w, k, n, n, 1).unwrap();
        let unpack = |q: &QWeights| -> Vec<f32> { q.unpacked().iter().enumerate().map(|(i, &v)| v as f32 * q.scale[i % n]).collect() };
        let (eg, er) = (product_error(&x, &w, &unpack(&g), k, n), product_error(&x, &w, &unpack(&rtn), k, n));
        assert!(eg < 0.7 * er, "gptq {eg} vs rtn {er}");
        assert_eq!(g.scale, rtn.scale);
    }

    /// Block-wise int4 with GPTQ: products closer to float than round-to-nearest's.
    #[test]
    fn int4_gptq_beats_round_to_nearest_on_the_products() {
        let (m, k, n) = (256, 64, 16);
        let mut r = lcg(11);
        let x = correlated_rows(m, k, &mut r);
        let w: Vec<f32> = (0..k * n).map(|_| r()).collect();
        let mut hs = Hessian::new(k);
        hs.add_rows(&x).unwrap();
        for zero_points in [false, true] {
            let fmt = Int4Format { block: 32, zero_points, f16_scales: true };
            let g = quantize_int4(&w, k, n, &hs, &fmt).unwrap().unwrap();
            let rtn = int4::quantize_matmul(&w, k, n, &fmt).unwrap();
            let err = |q: &Int4Weight| product_error(&x, &w, &int4::dequantize_matmul(q, k, n, fmt.block).unwrap(), k, n);
            let (eg, er) = (err(&g), err(&rtn));
            assert!(eg < 0.7 * er, "zero points {zero_points}: gptq {eg} vs rtn {er}");
        }
    }

    #[test]
    fn corrected_bias_removes_the_mean_output_shift() {
        let (m, k, n) = (300, 12, 5);
        let mut r = lcg(11);
        // Inputs with a non-zero mean per column, and weights rounded coarsely (to 0.25).
        let x: Vec<f32> = (0..m * k).map(|i| r() + (i % k) as f32 * 0.3).collect();
        let w: Vec<f32> = (0..k * n).map(|_| r()).collect();
        let deq: Vec<f32> = w.iter().map(|v| (v * 4.0).round() / 4.0).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32).collect();
        let mut hs = Hessian::new(k);
        hs.add_rows(&x).unwrap();
        let fixed = corrected_bias(Some(&bias), &w, &deq, n, &hs).unwrap();
        let mean_out = |w: &[f32], b: &[f32], j: usize| -> f64 {
            (0..m).map(|i| b[j] as f64 + (0..k).map(|p| x[i * k + p] as f64 * w[p * n + j] as f64).sum::<f64>()).sum::<f64>() / m as f64
        };
        for j in 0..n {
            let (want, before, after) = (mean_out(&w, &bias, j), mean_out(&deq, &bias, j), mean_out(&deq, &fixed, j));
            assert!((after - want).abs() < 1e-4, "column {j}: {after} vs {want}");
            assert!((before - want).abs() > 1e-3, "column {j}: the rounding should shift the mean");
        }
        assert!(corrected_bias(None, &w, &deq, n + 1, &hs).is_none(), "shape mismatch");
    }
}
