//! Int8 GEMM throughput (u8 activations × i8 weights, dequantizing epilogue) on the shapes of the
//! quantized real models, per available microkernel, at 1 and 2 threads; with the cost of
//! quantizing the activations per row shown apart. Reports GOPS (2 ops per multiply-add).
//!
//! cargo run --release -p kiln-benches --bin qgemm [-- --quick] [--only TEXT]   (TEXT filters rows:
//! a kernel name like Avx512Vnni or a shape like 16×1536)

use std::hint::black_box;
use std::time::Duration;

use kiln_backends::cpu::gemm::Act;
use kiln_backends::cpu::qgemm::{self, Out, PackedRef, QActs, QEpilogue, QKernel};
use kiln_benches::{best_time, fill};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 100 } else { 300 });
    let args: Vec<String> = std::env::args().collect();
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    // MiniLM batch 1 (16 tokens) and batch 4×128, a 1x1 conv of OCR det, and 1024³.
    let shapes: &[(usize, usize, usize, Act)] = &[
        (16, 384, 384, Act::None),
        (16, 1536, 384, Act::GeluErf),
        (16, 384, 1536, Act::None),
        (512, 1536, 384, Act::GeluErf),
        (6400, 96, 96, Act::Relu),
        (1024, 1024, 1024, Act::None),
    ];
    println!("{:>18} {:>3} {:>11}  {:>9} {:>9}  {:>9}", "m×n×k (act)", "thr", "kernel", "µs", "GOPS", "quant µs");
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        for &(m, n, k, act) in shapes {
            for kern in QKernel::available() {
                let label = format!("{m}×{n}×{k} {kern:?}");
                if only.as_deref().is_some_and(|o| !label.contains(o)) {
                    continue;
                }
                pool.install(|| bench(m, n, k, act, kern, threads, budget));
            }
        }
    }
}

fn bench(m: usize, n: usize, k: usize, act: Act, kern: QKernel, threads: usize, budget: Duration) {
    let a = fill(m * k, 1);
    let w = qgemm::quantize_weights(&fill(k * n, 2), k, n, n, 1).expect("weights");
    let bias = fill(n, 3);
    let mut c = vec![0f32; m * n];
    let t_quant = best_time(budget, || {
        black_box(qgemm::quantize_rows(black_box(&a), m, k));
    });
    let (q, scale, zero) = qgemm::quantize_rows(&a, m, k);
    let epi = QEpilogue { bias: Some(&bias), act };
    let t = best_time(budget, || {
        let acts = QActs { data: &q, ld: qgemm::padded_k(k), scale: &scale, zero: &zero };
        let out = Out { data: black_box(&mut c), rs: n, cs: 1 };
        qgemm::qgemm_with(kern, m, acts, PackedRef::from(&w), &epi, out, threads > 1).unwrap();
    });
    let gops = 2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9;
    println!(
        "{:>18} {:>3} {:>11}  {:>9.1} {:>9.1}  {:>9.1}",
        format!("{m}×{n}×{k} {}", if act == Act::None { "" } else { "+act" }),
        threads,
        format!("{kern:?}"),
        t.as_secs_f64() * 1e6,
        gops,
        t_quant.as_secs_f64() * 1e6
    );
}
