//! Convolution throughput on shapes from PP-OCRv4 det/rec and PP-LCNet: dense 3x3 (stride 1 and
//! 2), 1x1, and depthwise 3x3 / 5x5, through the CPU backend's Conv kernel (bias included), at 1
//! and 2 threads.
//!
//! cargo run --release -p kiln-benches --bin conv [-- --quick] [name filter]   (KILN_ISA=scalar|avx2|avx512 respected)

use std::time::Duration;

use kiln_backends::cpu::eval_step;
use kiln_backends::cpu::isa;
use kiln_benches::{best_time, fill};
use kiln_runtime::manifest::{Attr, AttrKind, Step};
use kiln_runtime::Tensor;

/// One convolution: input [1, c, h, w], `m` output channels, square kernel `k`, stride (sh, sw),
/// symmetric padding `pad`, `group` groups.
struct Shape {
    name: &'static str,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    k: usize,
    stride: [usize; 2],
    pad: usize,
    group: usize,
}

const SHAPES: &[Shape] = &[
    Shape { name: "det 3x3 s1 96->24 @160", c: 96, h: 160, w: 160, m: 24, k: 3, stride: [1, 1], pad: 1, group: 1 },
    Shape { name: "det 3x3 s2 3->16 @640", c: 3, h: 640, w: 640, m: 16, k: 3, stride: [2, 2], pad: 1, group: 1 },
    Shape { name: "det 1x1 48->48 @160", c: 48, h: 160, w: 160, m: 48, k: 1, stride: [1, 1], pad: 0, group: 1 },
    Shape { name: "det 1x1 16->32 @320", c: 16, h: 320, w: 320, m: 32, k: 1, stride: [1, 1], pad: 0, group: 1 },
    Shape { name: "det 1x1 384->384 @20", c: 384, h: 20, w: 20, m: 384, k: 1, stride: [1, 1], pad: 0, group: 1 },
    Shape { name: "rec 1x1 240->240 @12x80", c: 240, h: 12, w: 80, m: 240, k: 1, stride: [1, 1], pad: 0, group: 1 },
    Shape { name: "rec 1x1 480->480 @6x80", c: 480, h: 6, w: 80, m: 480, k: 1, stride: [1, 1], pad: 0, group: 1 },
    Shape { name: "det dw3x3 s1 16 @320", c: 16, h: 320, w: 320, m: 16, k: 3, stride: [1, 1], pad: 1, group: 16 },
    Shape { name: "det dw3x3 s2 32 @320", c: 32, h: 320, w: 320, m: 32, k: 3, stride: [2, 2], pad: 1, group: 32 },
    Shape { name: "det dw5x5 s1 192 @40", c: 192, h: 40, w: 40, m: 192, k: 5, stride: [1, 1], pad: 2, group: 192 },
    Shape { name: "rec dw5x5 s1 240 @12x80", c: 240, h: 12, w: 80, m: 240, k: 5, stride: [1, 1], pad: 2, group: 240 },
    Shape { name: "rec dw5x5 s2x1 240 @12x80", c: 240, h: 12, w: 80, m: 240, k: 5, stride: [2, 1], pad: 2, group: 240 },
    Shape { name: "lcnet dw3x3 s1 16 @112", c: 16, h: 112, w: 112, m: 16, k: 3, stride: [1, 1], pad: 1, group: 16 },
    Shape { name: "lcnet dw3x3 s2 32 @112", c: 32, h: 112, w: 112, m: 32, k: 3, stride: [2, 2], pad: 1, group: 32 },
    Shape { name: "lcnet dw3x3 s1 64 @56", c: 64, h: 56, w: 56, m: 64, k: 3, stride: [1, 1], pad: 1, group: 64 },
    Shape { name: "lcnet dw3x3 s2 64 @56", c: 64, h: 56, w: 56, m: 64, k: 3, stride: [2, 2], pad: 1, group: 64 },
    Shape { name: "lcnet dw3x3 s1 128 @28", c: 128, h: 28, w: 28, m: 128, k: 3, stride: [1, 1], pad: 1, group: 128 },
    Shape { name: "lcnet dw3x3 s2 128 @28", c: 128, h: 28, w: 28, m: 128, k: 3, stride: [2, 2], pad: 1, group: 128 },
    Shape { name: "lcnet dw5x5 s1 256 @14", c: 256, h: 14, w: 14, m: 256, k: 5, stride: [1, 1], pad: 2, group: 256 },
    Shape { name: "lcnet dw5x5 s2 256 @14", c: 256, h: 14, w: 14, m: 256, k: 5, stride: [2, 2], pad: 2, group: 256 },
    Shape { name: "lcnet dw5x5 s1 512 @7", c: 512, h: 7, w: 7, m: 512, k: 5, stride: [1, 1], pad: 2, group: 512 },
];

fn ints(name: &str, v: &[i64]) -> Attr {
    Attr { name: name.into(), kind: AttrKind::Ints as i32, ints: v.to_vec(), ..Default::default() }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--")).unwrap_or_default();
    let budget = Duration::from_millis(if quick { 150 } else { 500 });
    println!("ISA {}", isa::active());
    println!("{:>28} {:>3}  {:>9} {:>8}", "conv", "thr", "ms", "GFLOP/s");
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        for s in SHAPES.iter().filter(|s| s.name.contains(filter.as_str())) {
            pool.install(|| bench(s, threads, budget));
        }
    }
}

fn bench(s: &Shape, threads: usize, budget: Duration) {
    let cpg = s.c / s.group;
    let x = Tensor::from_vec(&[1, s.c, s.h, s.w], fill(s.c * s.h * s.w, 1)).expect("x");
    let w = Tensor::from_vec(&[s.m, cpg, s.k, s.k], fill(s.m * cpg * s.k * s.k, 2)).expect("w");
    let b = Tensor::from_vec(&[s.m], fill(s.m, 3)).expect("b");
    let p = s.pad as i64;
    let attrs = vec![
        ints("kernel_shape", &[s.k as i64, s.k as i64]),
        ints("strides", &[s.stride[0] as i64, s.stride[1] as i64]),
        ints("pads", &[p, p, p, p]),
        Attr { name: "group".into(), kind: AttrKind::Int as i32, i: s.group as i64, ..Default::default() },
    ];
    let step = Step { op: "Conv".into(), opset: 17, outputs: vec![0], attrs, ..Default::default() };
    let inputs = [Some(x), Some(w), Some(b)];
    let y = eval_step(&step, &inputs).expect("conv");
    let out_plane = y[0].len() / s.m;
    let flops = 2.0 * (s.m * out_plane * cpg * s.k * s.k) as f64;
    let t = best_time(budget, || {
        std::hint::black_box(eval_step(&step, &inputs).expect("conv"));
    });
    println!("{:>28} {:>3}  {:>9.3} {:>8.1}", s.name, threads, t.as_secs_f64() * 1e3, flops / t.as_secs_f64() / 1e9);
}
