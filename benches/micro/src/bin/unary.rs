//! Throughput of kiln's vectorised unary ops and activations (ns per element) on one tensor of
//! 64 Ki floats (L2-resident), through the CPU backend's kernels, one thread.
//!
//! cargo run --release -p kiln-benches --bin unary [-- --quick]     (KILN_ISA=scalar|avx2|avx512 respected)

use std::time::Duration;

use kiln_backends::cpu::eval_step;
use kiln_backends::cpu::isa;
use kiln_benches::{best_time, fill};
use kiln_runtime::manifest::Step;
use kiln_runtime::Tensor;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 100 } else { 300 });
    let n = 1 << 16;
    let x = Tensor::from_vec(&[n], fill(n, 1).iter().map(|v| v * 4.0).collect()).expect("tensor");
    println!("ISA {}", isa::active());
    println!("{:>12} {:>10}", "op", "ns/elem");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    for (op, opset) in [("Relu", 14), ("Sigmoid", 13), ("Tanh", 13), ("Exp", 13), ("Erf", 13), ("Gelu", 20), ("HardSwish", 14)] {
        let step = Step { op: op.into(), opset, inputs: vec![0], outputs: vec![1], ..Default::default() };
        let inputs = [Some(x.clone())];
        let t = pool.install(|| best_time(budget, || {
            std::hint::black_box(eval_step(&step, &inputs).expect("op"));
        }));
        println!("{:>12} {:>10.3}", op, t.as_secs_f64() * 1e9 / n as f64);
    }
}
