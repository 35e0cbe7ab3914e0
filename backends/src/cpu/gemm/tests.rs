//! sgemm against a triple-loop f64 reference, for every ISA this CPU supports.

use proptest::prelude::*;

use super::*;
use crate::cpu::isa::available;
use crate::cpu::kernels::elementwise::testing::rand_f32;


fn act_ref(x: f64, act: Act) -> f64 {
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    match act {
        Act::None => x,
        Act::Relu => x.max(0.0),
        Act::Clip(lo, hi) => x.max(lo as f64).min(hi as f64),
        Act::LeakyRelu(a) => if x < 0.0 { a as f64 * x } else { x },
        Act::Sigmoid => sig(x),
        Act::HardSigmoid(a, b) => (a as f64 * x + b as f64).clamp(0.0, 1.0),
        Act::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
        Act::Silu => x * sig(x),
        Act::Tanh => x.tanh(),
        Act::GeluErf => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Act::GeluTanh => 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()),
    }
}

const ACTS: [Act; 11] = [
    Act::None,
    Act::Relu,
    Act::Clip(-0.5, 0.75),
    Act::LeakyRelu(0.1),
    Act::Sigmoid,
    Act::HardSigmoid(0.2, 0.5),
    Act::HardSwish,
    Act::Silu,
    Act::Tanh,
    Act::GeluErf,
    Act::GeluTanh,
];

struct Case {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    bias: bool,
    act: Act,
    alpha: f32,
    prepacked: bool,
    parallel: bool,
    extra_ldc: usize,
    /// With `prepacked`: pass the packed bytes as a borrowed view (as artifact constants are).
    view: bool,
}

fn run_case(isa: Isa, t: &Case) -> std::result::Result<(), String> {
    let Case { m, n, k, .. } = *t;
    let a_data = rand_f32(m * k, 1 + (m * 31 + k) as u64, 1.0);
    let b_data = rand_f32(k * n, 2 + (k * 17 + n) as u64, 1.0);
    let bias = rand_f32(n, 3, 1.0);
    let ldc = n + t.extra_ldc;
    let c0 = rand_f32(m.max(1) * ldc, 4, 1.0);
    // A is m×k; stored transposed (k×m row-major) when trans_a.
    let a = if t.trans_a { MatRef::cols(&a_data, m) } else { MatRef::rows(&a_data, k) };
    let b = if t.trans_b { MatRef::cols(&b_data, k) } else { MatRef::rows(&b_data, n) };
    let at = |i: usize, p: usize| a.data[i * a.rs + p * a.cs] as f64;
    let bt = |p: usize, j: usize| b.data[p * b.rs + j * b.cs] as f64;
    let epi = Epilogue { alpha: t.alpha, bias: t.bias.then_some(&bias[..]), act: t.act };
    let packed;
    let bref = if t.prepacked {
        packed = PackedB::new(isa, b, k, n).map_err(|e| e.to_string())?;
        if t.view {
            BRef::PackedView(PackedView::from_bytes(packed.as_bytes()).map_err(|e| e.to_string())?.ok_or("misaligned")?)
        } else {
            BRef::Packed(&packed)
        }
    } else {
        BRef::Mat(b)
    };
    let mut c = c0.clone();
    sgemm_with(isa, m, n, k, a, bref, &mut c, ldc, t.accumulate, &epi, t.parallel).map_err(|e| e.to_string())?;
    for i in 0..m {
        for j in 0..ldc {
            let got = c[i * ldc + j];
            if j >= n {
                if got != c0[i * ldc + j] {
                    return Err(format!("{isa}: wrote padding at ({i},{j})"));
                }
                continue;
            }
            let mut s = 0f64;
            let mut mag = 0f64;
            for p in 0..k {
                s += at(i, p) * bt(p, j);
                mag += (at(i, p) * bt(p, j)).abs();
            }
            let mut v = t.alpha as f64 * s;
            if t.accumulate {
                v += c0[i * ldc + j] as f64;
            }
            if t.bias {
                v += bias[j] as f64;
            }
            let want = act_ref(v, t.act);
            // f32 summation error grows with k and the magnitude of the terms.
            let tol = 1e-5 * (1.0 + mag + v.abs()) + 2e-6 * want.abs();
            if (got as f64 - want).abs() > tol {
                return Err(format!("{isa} ({i},{j}) of {m}x{n}x{k}: got {got}, want {want}"));
            }
        }
    }
    Ok(())
}

fn base(m: usize, n: usize, k: usize) -> Case {
    Case {
        m,
        n,
        k,
        trans_a: false,
        trans_b: false,
        accumulate: false,
        bias: false,
        act: Act::None,
        alpha: 1.0,
        prepacked: false,
        parallel: false,
        extra_ldc: 0,
        view: false,
    }
}

#[test]
fn every_isa_fixed_shapes() {
    let shapes = [
        (1, 1, 1),
        (1, 384, 384),
        (3, 5, 7),
        (14, 32, 1),
        (15, 33, 17),
        (26, 100, 300),
        (29, 67, 257),
        (64, 97, 513),
        (130, 70, 45),
    ];
    for isa in available() {
        for &(m, n, k) in &shapes {
            for prepacked in [false, true] {
                for parallel in [false, true] {
                    let t = Case { prepacked, parallel, ..base(m, n, k) };
                    run_case(isa, &t).unwrap();
                }
            }
        }
    }
}

#[test]
fn every_act_with_bias_and_accumulate() {
    for isa in available() {
        for act in ACTS {
            let t = Case { act, bias: true, accumulate: true, alpha: 0.5, extra_ldc: 3, ..base(17, 45, 29) };
            run_case(isa, &t).unwrap();
        }
    }
}

#[test]
fn zero_k_and_empty() {
    for isa in available() {
        let t = Case { bias: true, act: Act::Relu, ..base(3, 5, 0) };
        run_case(isa, &t).unwrap();
        let t = Case { accumulate: true, ..base(3, 5, 0) };
        run_case(isa, &t).unwrap();
        let mut c = vec![];
        let empty = MatRef::rows(&[], 0);
        sgemm_with(isa, 0, 0, 4, empty, BRef::Mat(empty), &mut c, 0, false, &Epilogue::NONE, false).unwrap();
    }
}

#[test]
fn bad_operands_are_errors() {
    let a = vec![0f32; 6];
    let b = vec![0f32; 5];
    let mut c = vec![0f32; 9];
    let r = sgemm(3, 3, 2, MatRef::rows(&a, 2), BRef::Mat(MatRef::rows(&b, 3)), &mut c, 3, false, &Epilogue::NONE, false);
    assert!(r.is_err());
}

#[test]
fn packed_b_round_trips_and_relays() {
    let isa = crate::cpu::isa::best();
    let b = rand_f32(37 * 41, 9, 1.0);
    let p = PackedB::new(isa, MatRef::rows(&b, 41), 37, 41).unwrap();
    assert_eq!(p.as_bytes().as_ptr() as usize % 64, 0);
    let q = PackedB::from_bytes(p.as_bytes()).unwrap();
    assert_eq!((q.k(), q.n(), q.nr(), q.isa()), (37, 41, p.nr(), isa));
    assert_eq!(q.data(), p.data());
    for (pp, j) in [(0, 0), (36, 40), (5, 33)] {
        assert_eq!(q.get(pp, j), b[pp * 41 + j]);
    }
    // Packed for another ISA (e.g. an artifact from another machine): relaid on use.
    let other = PackedB::new(Isa::Neon, MatRef::rows(&b, 41), 37, 41).unwrap();
    let a = rand_f32(5 * 37, 10, 1.0);
    let mut c1 = vec![0f32; 5 * 41];
    let mut c2 = vec![0f32; 5 * 41];
    sgemm(5, 41, 37, MatRef::rows(&a, 37), BRef::Packed(&other), &mut c1, 41, false, &Epilogue::NONE, false).unwrap();
    sgemm(5, 41, 37, MatRef::rows(&a, 37), BRef::Mat(MatRef::rows(&b, 41)), &mut c2, 41, false, &Epilogue::NONE, false).unwrap();
    assert_eq!(c1, c2);
    // Corruptions are caught.
    let bytes = p.as_bytes().to_vec();
    assert!(PackedB::from_bytes(&bytes[..bytes.len() - 4]).is_err());
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(PackedB::from_bytes(&bad).is_err());
    let mut bad = bytes;
    bad[12] = 7;
    assert!(PackedB::from_bytes(&bad).is_err());
}

#[test]
fn hand_computed() {
    // [1 2; 3 4] · [5 6; 7 8] = [19 22; 43 50], + bias [1, -100], relu.
    let a = [1f32, 2., 3., 4.];
    let b = [5f32, 6., 7., 8.];
    for isa in available() {
        let mut c = [0f32; 4];
        let epi = Epilogue::new(Some(&[1.0, -100.0]), Act::Relu);
        sgemm_with(isa, 2, 2, 2, MatRef::rows(&a, 2), BRef::Mat(MatRef::rows(&b, 2)), &mut c, 2, false, &epi, false)
            .unwrap();
        assert_eq!(c, [20., 0., 44., 0.], "{isa}");
    }
}

fn act_strategy() -> impl Strategy<Value = Act> {
    (0..ACTS.len()).prop_map(|i| ACTS[i])
}

#[test]
fn skinny_every_layout_and_tail() {
    // m ≤ 4 takes the skinny path (dot products for Bᵀ, row axpys otherwise); 5 is the first
    // row count past it. k covers vector tails (15, 17) and n partial column blocks.
    let nk = [(1, 1), (3, 17), (33, 16), (64, 15), (65, 31), (130, 257), (512, 128), (97, 200)];
    for isa in available() {
        for m in 1..=5 {
            for &(n, k) in &nk {
                for (trans_a, trans_b, prepacked) in
                    [(false, false, false), (false, true, false), (true, true, false), (false, false, true), (true, false, false)]
                {
                    let t = Case { trans_a, trans_b, prepacked, view: prepacked && m % 2 == 0, ..base(m, n, k) };
                    run_case(isa, &t).unwrap();
                }
                let t = Case {
                    trans_b: n % 2 == 1,
                    accumulate: true,
                    bias: true,
                    act: Act::Tanh,
                    alpha: -0.75,
                    extra_ldc: 5,
                    ..base(m, n, k)
                };
                run_case(isa, &t).unwrap();
            }
        }
        // Large enough to split the columns across threads.
        for trans_b in [false, true] {
            run_case(isa, &Case { trans_b, parallel: true, bias: true, act: Act::Sigmoid, ..base(3, 1000, 300) }).unwrap();
            run_case(isa, &Case { trans_b, parallel: true, prepacked: true, view: true, ..base(1, 777, 400) }).unwrap();
        }
    }
}

#[test]
fn packed_view_in_place() {
    let b = rand_f32(19 * 70, 21, 1.0);
    for isa in available() {
        let p = PackedB::new(isa, MatRef::rows(&b, 70), 19, 70).unwrap();
        let bytes = p.as_bytes();
        let v = PackedView::from_bytes(bytes).unwrap().expect("aligned");
        assert_eq!((v.k(), v.n(), v.nr(), v.isa()), (19, 70, p.nr(), isa));
        // The view reads the same memory: no copy.
        assert_eq!(v.data().as_ptr(), p.data().as_ptr());
        assert_eq!(v.get(18, 69), b[18 * 70 + 69]);
        // Misaligned bytes cannot be viewed in place (callers copy with PackedB::from_bytes).
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(bytes);
        assert!(PackedView::from_bytes(&shifted[1..]).unwrap().is_none());
        assert_eq!(PackedB::from_bytes(&shifted[1..]).unwrap().data(), p.data());
        // Corruptions are errors, not panics.
        assert!(PackedView::from_bytes(&bytes[..bytes.len() - 4]).is_err());
        assert!(PackedView::from_bytes(&bytes[..10]).is_err());
        let mut bad = bytes.to_vec();
        bad[16] = 0xff; // k
        assert!(PackedView::from_bytes(&bad).is_err());
        let mut bad = bytes.to_vec();
        bad[8] = 9; // ISA code
        assert!(PackedView::from_bytes(&bad).is_err());
        // A view with the wrong shape for the product is an error.
        let a = rand_f32(2 * 19, 22, 1.0);
        let mut c = vec![0f32; 2 * 71];
        let r = sgemm_with(isa, 2, 71, 19, MatRef::rows(&a, 19), BRef::PackedView(v), &mut c, 71, false, &Epilogue::NONE, false);
        assert!(r.is_err());
    }
}

#[test]
fn tanh_epilogue_is_accurate() {
    // The vector tanh must agree with libm closely (recurrent gates and fused Tanh use it).
    let xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.0271).collect();
    for isa in available() {
        let mut c = xs.clone();
        let epi = Epilogue::new(None, Act::Tanh);
        let one = [1f32];
        let a = MatRef::rows(&xs, 1);
        sgemm_with(isa, xs.len(), 1, 1, a, BRef::Mat(MatRef::rows(&one, 1)), &mut c, 1, false, &epi, false).unwrap();
        for (&x, &y) in xs.iter().zip(&c) {
            let want = (x as f64).tanh();
            assert!((y as f64 - want).abs() <= 4e-7 * want.abs() + 1e-30, "{isa} tanh({x}) = {y}, want {want}");
        }
    }
}

fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![1..=4usize, Just(7usize), Just(13), Just(31), Just(37), 1..=80usize]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn matches_reference(
        m in prop_oneof![1..=20usize, dim()], n in dim(), k in prop_oneof![1..=3usize, Just(97usize), Just(263), 1..=300usize],
        trans_a: bool, trans_b: bool, accumulate: bool, bias: bool, prepacked: bool, parallel: bool,
        act in act_strategy(), alpha in prop_oneof![Just(1.0f32), Just(-0.75f32)], extra_ldc in 0..3usize,
        view: bool,
    ) {
        let t = Case { m, n, k, trans_a, trans_b, accumulate, bias, act, alpha, prepacked, parallel, extra_ldc, view };
        for isa in available() {
            prop_assert_eq!(run_case(isa, &t), Ok(()));
        }
    }
}

#[test]
fn splits_cover_and_align() {
    assert_eq!(chunks(10, 4, 2), vec![(0, 4), (4, 10)]);
    assert_eq!(chunks(3, 4, 2), vec![(0, 3)]);
    let kern = kernel_for(Isa::Scalar);
    assert_eq!(split(26, 1536, 384, kern, 2), (1, 2));
    assert_eq!(split(1, 384, 384, kern, 2), (1, 1));
    assert_eq!(split(1024, 64, 1024, kern, 2), (2, 1));
    // A big case that really runs on several tasks.
    for isa in available() {
        run_case(isa, &Case { parallel: true, bias: true, act: Act::Silu, ..base(150, 90, 200) }).unwrap();
        run_case(isa, &Case { parallel: true, prepacked: true, trans_a: true, ..base(40, 300, 180) }).unwrap();
    }
}

/// Every ISA's microkernels (strided and gathered B) called directly, every tile shape, against an
/// f64 reference: on aarch64 this is the NEON 8×12 kernel, on x86 the AVX2/AVX-512 ones. Also
/// checks that nothing outside the mr×nr tile of C is written.
#[test]
fn microkernels_every_tile_shape() {
    for isa in available() {
        let kern = kernel_for(isa);
        assert_eq!(kern.isa, isa, "{isa} has no kernel family of its own");
        assert_eq!(kern.nr, nr_for(isa));
        let (mrmax, nrmax) = (kern.mr, kern.nr);
        for kc in [1usize, 2, 3, 4, 5, 7, 8, 13, 64, 259] {
            // A packed MR-high, B rows ldb apart (NR readable floats each), C with extra columns
            // and one extra row as a canary.
            let ldb = nrmax + 3;
            let ldc = nrmax + 5;
            let a = rand_f32(kc * mrmax, 100 + kc as u64, 1.0);
            let blen = kc * ldb;
            let b = rand_f32(blen, 200 + kc as u64, 1.0);
            // Gathered rows: B's rows in a scrambled order, at arbitrary (unaligned) offsets.
            let offs: Vec<usize> = (0..kc).map(|p| ((p * 7 + 3) % kc) * ldb + (p % 3)).collect();
            let c0 = rand_f32((mrmax + 1) * ldc, 300 + kc as u64, 1.0);
            for mr in 1..=mrmax {
                for nr in 1..=nrmax {
                    for (load, alpha) in [(false, 1.0f32), (true, -0.5), (true, 1.0), (false, 0.25)] {
                        for gather in [false, true] {
                            let row = |p: usize| if gather { offs[p] } else { p * ldb };
                            let mut c = c0.clone();
                            // SAFETY: A holds kc·MR floats, every B row read leaves NR floats in
                            // `b` (row starts ≤ (kc-1)·ldb + 2, len kc·ldb, ldb = NR + 3), C
                            // holds mr rows of ldc ≥ nr floats.
                            unsafe {
                                if gather {
                                    (kern.gather)(mr, nr, kc, a.as_ptr(), b.as_ptr(), offs.as_ptr(), c.as_mut_ptr(), ldc, alpha, load);
                                } else {
                                    (kern.func)(mr, nr, kc, a.as_ptr(), b.as_ptr(), ldb, c.as_mut_ptr(), ldc, alpha, load);
                                }
                            }
                            for i in 0..=mrmax {
                                for j in 0..ldc {
                                    let (got, old) = (c[i * ldc + j], c0[i * ldc + j]);
                                    let what = format!("{isa} gather={gather} mr={mr} nr={nr} kc={kc} load={load} alpha={alpha} ({i},{j})");
                                    if i >= mr || j >= nr {
                                        assert_eq!(got.to_bits(), old.to_bits(), "{what}: wrote outside the tile");
                                        continue;
                                    }
                                    let (mut s, mut mag) = (0f64, 0f64);
                                    for p in 0..kc {
                                        let t = a[p * mrmax + i] as f64 * b[row(p) + j] as f64;
                                        s += t;
                                        mag += t.abs();
                                    }
                                    let want = alpha as f64 * s + if load { old as f64 } else { 0.0 };
                                    let tol = 1e-5 * (1.0 + mag + want.abs());
                                    assert!((got as f64 - want).abs() <= tol, "{what}: got {got}, want {want}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// On aarch64 the NEON kernels are there and chosen by default (a build that silently fell back to
/// the portable kernels would pass every other test).
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_is_available_and_dispatched() {
    assert!(Isa::Neon.supported());
    assert!(available().contains(&Isa::Neon));
    assert_eq!(crate::cpu::isa::best(), Isa::Neon);
    let kern = kernel_for(Isa::Neon);
    assert_eq!((kern.isa, kern.mr, kern.nr), (Isa::Neon, 8, 12));
    // Packed for NEON and used by NEON in place, and relaid for the portable kernels.
    let b = rand_f32(29 * 50, 41, 1.0);
    let p = PackedB::new(Isa::Neon, MatRef::rows(&b, 50), 29, 50).unwrap();
    assert_eq!((p.isa(), p.nr()), (Isa::Neon, 12));
    let a = rand_f32(19 * 29, 42, 1.0);
    let mut c1 = vec![0f32; 19 * 50];
    let mut c2 = vec![0f32; 19 * 50];
    sgemm_with(Isa::Neon, 19, 50, 29, MatRef::rows(&a, 29), BRef::Packed(&p), &mut c1, 50, false, &Epilogue::NONE, false).unwrap();
    sgemm_with(Isa::Scalar, 19, 50, 29, MatRef::rows(&a, 29), BRef::Packed(&p), &mut c2, 50, false, &Epilogue::NONE, false).unwrap();
    for (x, y) in c1.iter().zip(&c2) {
        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
    }
}
