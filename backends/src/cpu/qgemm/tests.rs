//! qgemm against a triple-loop reference on the same quantized values, for every kernel this CPU
//! runs; the quantizers against their definitions.

use proptest::prelude::*;

use super::*;
use crate::cpu::kernels::elementwise::testing::rand_f32;


/// The expected output from the quantized operands, in f64.
#[allow(clippy::too_many_arguments)]
fn reference(m: usize, qa: &[u8], ld: usize, sa: &[f32], za: &[i32], w: &QWeights, bias: Option<&[f32]>, act: Act) -> Vec<f32> {
    let qw = w.unpacked();
    let mut out = vec![0f32; m * w.n];
    for i in 0..m {
        let (s, z) = (sa[if sa.len() == 1 { 0 } else { i }], za[if za.len() == 1 { 0 } else { i }]);
        for j in 0..w.n {
            let dot: i64 = (0..w.k).map(|p| (qa[i * ld + p] as i64 - z as i64) * qw[p * w.n + j] as i64).sum();
            let v = dot as f64 * s as f64 * w.scale[j] as f64 + bias.map_or(0.0, |b| b[j] as f64);
            out[i * w.n + j] = crate::cpu::gemm::act_scalar(v as f32, act);
        }
    }
    out
}

fn close(got: &[f32], want: &[f32], what: &str) {
    for (idx, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{what}: element {idx}: {g} vs {w}");
    }
}

#[allow(clippy::too_many_arguments)]
fn check_case(m: usize, k: usize, n: usize, per_row: bool, bias: bool, act: Act, transposed: bool, seed: u64) {
    let wf = rand_f32(k * n, seed, 1.0);
    let w = quantize_weights(&wf, k, n, n, 1).unwrap();
    let af: Vec<f32> = rand_f32(m * k, seed + 1, 1.0).iter().map(|x| x * 3.0 + 0.5).collect();
    let (qa, sa, za) = if per_row {
        quantize_rows(&af, m, k)
    } else {
        // Static: one range for all rows, and extra padding in the row stride.
        let ld = padded_k(k) + 8;
        let (s, z) = u8_params(-2.5, 3.5);
        let mut q = vec![7u8; m * ld];
        for i in 0..m {
            quantize_u8(&af[i * k..(i + 1) * k], &mut q[i * ld..i * ld + k], s, z);
        }
        (q, vec![s], vec![z])
    };
    let ld = if per_row { padded_k(k) } else { padded_k(k) + 8 };
    let bv = rand_f32(n, seed + 2, 1.0);
    let bias = bias.then_some(bv.as_slice());
    let want = reference(m, &qa, ld, &sa, &za, &w, bias, act);
    for kern in QKernel::available() {
        for parallel in [false, true] {
            let mut out = vec![f32::NAN; m * n];
            let (rs, cs) = if transposed { (1, m) } else { (n, 1) };
            let acts = QActs { data: &qa, ld, scale: &sa, zero: &za };
            qgemm_with(kern, m, acts, (&w).into(), &QEpilogue { bias, act }, Out { data: &mut out, rs, cs }, parallel).unwrap();
            let got: Vec<f32> = if transposed {
                (0..m * n).map(|x| out[(x % n) * m + x / n]).collect()
            } else {
                out
            };
            close(&got, &want, &format!("{kern:?} m{m} k{k} n{n} per_row {per_row} par {parallel}"));
        }
    }
}

#[test]
fn edge_shapes_every_kernel() {
    for &(m, k, n) in &[(1, 1, 1), (1, 3, 17), (3, 5, 16), (8, 4, 32), (9, 7, 33), (16, 384, 384), (17, 33, 47), (70, 20, 50), (2, 130, 5)] {
        check_case(m, k, n, true, true, Act::None, false, (m * 31 + k * 7 + n) as u64);
        check_case(m, k, n, false, false, Act::Relu, true, (m + k + n) as u64);
    }
}

#[test]
fn large_values_do_not_saturate() {
    // All activations 255 and weights ±127 in the same column: vpmaddubsw would saturate here.
    let (m, k, n) = (5, 64, 20);
    let q: Vec<i8> = (0..k * n).map(|x| if x % 3 == 0 { -127 } else { 127 }).collect();
    let (packed, sum) = pack_i8(&q, k, n);
    let w = QWeights { k, n, packed, scale: vec![1.0; n], sum };
    let qa = vec![255u8; m * k];
    let want = reference(m, &qa, k, &[1.0], &[0], &w, None, Act::None);
    for kern in QKernel::available() {
        let mut out = vec![0f32; m * n];
        let acts = QActs { data: &qa, ld: k, scale: &[1.0], zero: &[0] };
        qgemm_with(kern, m, acts, (&w).into(), &QEpilogue { bias: None, act: Act::None }, Out { data: &mut out, rs: n, cs: 1 }, false).unwrap();
        assert_eq!(out, want, "{kern:?}");
    }
}

#[test]
fn quantizers() {
    let (s, z) = u8_params(-1.0, 3.0);
    assert!((s - 4.0 / 255.0).abs() < 1e-9);
    assert_eq!(z, 64);
    assert_eq!(u8_params(2.0, 5.0).1, 0); // range widened to hold 0
    assert_eq!(u8_params(0.0, 0.0), (1.0, 0));
    let mut q = [0u8; 4];
    quantize_u8(&[-10.0, 0.0, 1.0, 100.0], &mut q, s, z);
    assert_eq!(q, [0, 64, 128, 255]);
    let w = quantize_weights(&[0.5, -1.0, 0.25, 2.0], 2, 2, 2, 1).unwrap();
    assert_eq!(w.scale, vec![0.5 / 127.0, 2.0 / 127.0]);
    assert_eq!(w.unpacked(), vec![127, -64, 64, 127]);
    assert_eq!(w.sum, vec![191, 63]);
    assert!(quantize_weights(&[f32::NAN], 1, 1, 1, 1).is_err());
}

#[test]
fn rejects_bad_operands() {
    let w = quantize_weights(&rand_f32(12, 1, 1.0), 3, 4, 4, 1).unwrap();
    let qa = vec![0u8; 4];
    let mut out = vec![0f32; 8];
    let epi = QEpilogue { bias: None, act: Act::None };
    let bad_a = QActs { data: &qa, ld: 4, scale: &[1.0], zero: &[0] };
    assert!(qgemm(2, bad_a, (&w).into(), &epi, Out { data: &mut out, rs: 4, cs: 1 }, false).is_err());
    let qa = vec![0u8; 8];
    let a = QActs { data: &qa, ld: 4, scale: &[1.0, 2.0, 3.0], zero: &[0] };
    assert!(qgemm(2, a, (&w).into(), &epi, Out { data: &mut out, rs: 4, cs: 1 }, false).is_err());
    let a = QActs { data: &qa, ld: 4, scale: &[1.0], zero: &[0] };
    assert!(qgemm(2, a, (&w).into(), &epi, Out { data: &mut out[..7], rs: 4, cs: 1 }, false).is_err());
    let b = [0f32; 3];
    let epi_b = QEpilogue { bias: Some(&b), act: Act::None };
    assert!(qgemm(2, a, (&w).into(), &epi_b, Out { data: &mut out, rs: 4, cs: 1 }, false).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn matches_reference(m in 1usize..40, k in 1usize..80, n in 1usize..70, per_row: bool, bias: bool, transposed: bool, act_i in 0usize..3, seed in 0u64..1000) {
        let act = [Act::None, Act::Relu, Act::GeluErf][act_i];
        check_case(m, k, n, per_row, bias, act, transposed, seed);
    }
}
