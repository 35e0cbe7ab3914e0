//! SGEMM throughput: kiln's packed SIMD GEMM against the FMA peak of the active ISA (measured here)
//! and against the `gemm` crate, at 1 and 2 threads.
//!
//! cargo run --release -p kiln-benches --bin gemm [-- --quick]     (KILN_ISA=scalar|avx2|avx512 respected)

use std::hint::black_box;
use std::time::{Duration, Instant};

use kiln_backends::cpu::gemm::{sgemm, Act, BRef, Epilogue, MatRef, PackedB};
use kiln_backends::cpu::isa::{self, Isa};
use kiln_benches::{best_time, fill};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 100 } else { 300 });
    let isa = isa::active();
    let peak = fma_peak(isa, Duration::from_millis(500));
    println!("ISA {isa} (vnni: {}), FMA peak {:.1} GFLOP/s per core (measured)", isa::vnni(), peak);
    let shapes: &[(usize, usize, usize)] =
        &[(1024, 1024, 1024), (1, 384, 384), (26, 384, 1536), (128, 384, 384), (8, 768, 768), (64, 1536, 384)];
    // Small-M shapes of the real models: MiniLM at batch 1 (16 tokens) and the Silero VAD LSTM.
    let small: &[(usize, usize, usize)] =
        &[(16, 384, 384), (16, 384, 1536), (16, 1536, 384), (1, 128, 512), (1, 512, 128), (4, 512, 128)];
    // MiniLM at batch 4 × 128 tokens: the FFN products and one attention head (QKᵀ, then ·V).
    let batch: &[(usize, usize, usize)] = &[(512, 384, 384), (512, 1536, 384), (512, 384, 1536), (128, 128, 32), (128, 32, 128)];
    let mut shapes = [shapes, small, batch].concat();
    // `--shape MxNxK` (repeatable): only these shapes, to iterate on one kernel quickly.
    let only: Vec<(usize, usize, usize)> = std::env::args()
        .skip_while(|a| a != "--shape")
        .skip(1)
        .step_by(2)
        .filter_map(|s| {
            let d: Vec<usize> = s.split('x').filter_map(|v| v.parse().ok()).collect();
            (d.len() == 3).then(|| (d[0], d[1], d[2]))
        })
        .collect();
    if !only.is_empty() {
        shapes = only;
    }
    println!(
        "{:>16} {:>3}  {:>9} {:>7}  {:>9} {:>7}  {:>9}  {:>9}  {:>6}",
        "m×n×k", "thr", "kiln", "%peak", "prepacked", "%peak", "kiln Bᵀ", "gemm-crate", "kiln/crate"
    );
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        for &(m, n, k) in &shapes {
            pool.install(|| bench_shape(m, n, k, threads, peak, budget));
        }
    }
    bench_epilogues(budget);
}

/// What the fused epilogue costs on the MiniLM b4 FFN product (prepacked, 1 thread): the product
/// alone, with bias, and with bias and each activation the fusion passes put there.
fn bench_epilogues(budget: Duration) {
    let (m, n, k) = (512, 1536, 384);
    let (a, b, bias) = (fill(m * k, 1), fill(k * n, 2), fill(n, 4));
    let mut c = vec![0f32; m * n];
    let packed = PackedB::for_active(MatRef::rows(&b, n), k, n).unwrap();
    let am = MatRef::rows(&a, k);
    let mut time = |epi: Epilogue| {
        best_time(budget, || {
            sgemm(m, n, k, am, BRef::Packed(&packed), black_box(&mut c), n, false, &epi, false).unwrap();
        })
    };
    let base = time(Epilogue::NONE);
    println!("epilogue on {m}×{n}×{k} (1 thread, prepacked): product alone {:.3} ms", base.as_secs_f64() * 1e3);
    for (name, act) in [
        ("bias", Act::None),
        ("bias+Relu", Act::Relu),
        ("bias+Sigmoid", Act::Sigmoid),
        ("bias+GeluErf", Act::GeluErf),
        ("bias+GeluTanh", Act::GeluTanh),
    ] {
        let t = time(Epilogue::new(Some(&bias), act));
        let extra = t.as_secs_f64() - base.as_secs_f64();
        println!("{name:>16}  {:>7.3} ms  +{:>6.3} ms  {:>6.3} ns/elem", t.as_secs_f64() * 1e3, extra * 1e3, extra * 1e9 / (m * n) as f64);
    }
}

fn bench_shape(m: usize, n: usize, k: usize, threads: usize, peak: f64, budget: Duration) {
    let a = fill(m * k, 1);
    let b = fill(k * n, 2);
    let mut c = vec![0f32; m * n];
    let par = threads > 1;
    let flops = 2.0 * (m * n * k) as f64;
    let gf = |t: Duration| flops / t.as_secs_f64() / 1e9;
    let pct = |g: f64| 100.0 * g / (peak * threads as f64);
    let epi = Epilogue::NONE;
    let (am, bm) = (MatRef::rows(&a, k), MatRef::rows(&b, n));
    let t_kiln = best_time(budget, || {
        sgemm(m, n, k, am, BRef::Mat(bm), black_box(&mut c), n, false, &epi, par).unwrap();
    });
    let packed = PackedB::for_active(bm, k, n).unwrap();
    let t_packed = best_time(budget, || {
        sgemm(m, n, k, am, BRef::Packed(&packed), black_box(&mut c), n, false, &epi, par).unwrap();
    });
    // B stored transposed (an [n, k] weight read as k×n, as recurrent layers and Gemm transB do).
    let bt = fill(k * n, 3);
    let t_trans = best_time(budget, || {
        sgemm(m, n, k, am, BRef::Mat(MatRef::cols(&bt, k)), black_box(&mut c), n, false, &epi, par).unwrap();
    });
    let parallelism = if par { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let t_crate = best_time(budget, || unsafe {
        gemm::gemm(
            m, n, k, black_box(c.as_mut_ptr()), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr(), 1,
            n as isize, 0.0f32, 1.0f32, false, false, false, parallelism,
        )
    });
    let (g1, g2, g3, g4) = (gf(t_kiln), gf(t_packed), gf(t_crate), gf(t_trans));
    println!(
        "{:>16} {:>3}  {:>9.1} {:>6.1}%  {:>9.1} {:>6.1}%  {:>9.1}  {:>9.1}  {:>5.2}x",
        format!("{m}×{n}×{k}"),
        threads,
        g1,
        pct(g1),
        g2,
        pct(g2),
        g4,
        g3,
        g1 / g3
    );
}

/// GFLOP/s of one core running independent FMA chains for about `dur`.
fn fma_peak(isa: Isa, dur: Duration) -> f64 {
    let run = |iters: u64| -> (f64, Duration) {
        let t = Instant::now();
        let flops = fma_loop(isa, black_box(iters));
        (flops, t.elapsed())
    };
    let (_, t) = run(100_000);
    let iters = (100_000.0 * dur.as_secs_f64() / t.as_secs_f64().max(1e-6)) as u64;
    let (flops, t) = run(iters.max(1000));
    flops / t.as_secs_f64() / 1e9
}

/// Runs `iters` rounds of 12 independent vector FMAs; returns the flops done.
fn fma_loop(isa: Isa, iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the ISA is supported (isa::active only returns supported ones).
        Isa::Avx512 => return unsafe { x86::fma512(iters) },
        Isa::Avx2Fma => return unsafe { x86::fma256(iters) },
        _ => {}
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        return unsafe { arm::fma128(iters) };
    }
    let _ = isa;
    let mut acc = [0f32; 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = *a * 0.999_999 + 1e-7;
        }
    }
    black_box(acc);
    iters as f64 * 12.0 * 2.0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512(iters: u64) -> f64 {
        let x = _mm512_set1_ps(0.999_999);
        let y = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        black_box(acc);
        iters as f64 * 12.0 * 16.0 * 2.0
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256(iters: u64) -> f64 {
        let x = _mm256_set1_ps(0.999_999);
        let y = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        black_box(acc);
        iters as f64 * 12.0 * 8.0 * 2.0
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;
    use std::hint::black_box;

    #[target_feature(enable = "neon")]
    pub unsafe fn fma128(iters: u64) -> f64 {
        let x = vdupq_n_f32(0.999_999);
        let y = vdupq_n_f32(1e-7);
        let mut acc = [vdupq_n_f32(1.0); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = vfmaq_f32(y, *a, x);
            }
        }
        black_box(acc);
        iters as f64 * 12.0 * 4.0 * 2.0
    }
}
