//! Our f32 GEMM: packed operands, per-ISA register-tile microkernels chosen at run time, a fused
//! epilogue (alpha, bias, activation) and rayon parallelism over blocks of C.
//!
//! `sgemm` is the one dispatch point. Blocking follows the usual scheme: for each NC-wide column
//! block and KC-deep slice of K, B is packed into NR-wide panels (or used in place when few A
//! panels will read it, or taken from a prepacked `PackedB`), then for each MC-high row block A is
//! packed into MR-high panels and every MR×NR tile of C is one microkernel call. The epilogue runs
//! on a tile right after its last K slice, while the tile is still in L1.

mod epilogue;
mod kernel_scalar;
pub mod pack;
mod skinny;

#[cfg(target_arch = "aarch64")]
mod arm_neon;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

#[cfg(test)]
mod tests;

use std::cell::RefCell;

use kiln_runtime::{Error, Result};
use rayon::prelude::*;

pub use self::epilogue::{act_scalar, erf, Act, Epilogue};
pub(crate) use self::epilogue::{apply_act, apply_act_fma};
pub(crate) use self::epilogue::apply as apply_epilogue;
pub(crate) use self::epilogue::exp;
pub use self::pack::{PackedB, PackedView};
pub use crate::cpu::isa::Isa;
use crate::cpu::isa;
use self::pack::AlignedBuf;

/// A strided f32 matrix: element (i, j) is `data[i·rs + j·cs]` (cs = 1 row-major, rs = 1 transposed).
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        MatRef { data, rs, cs }
    }

    /// A row-major matrix with leading dimension `ld`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        MatRef { data, rs: ld, cs: 1 }
    }

    /// The transpose of a row-major matrix with leading dimension `ld`.
    pub fn cols(data: &'a [f32], ld: usize) -> Self {
        MatRef { data, rs: 1, cs: ld }
    }

    /// Whether a `r`×`c` matrix lies inside `data`.
    pub fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// The B operand: a matrix packed on the fly, or one packed ahead of time.
#[derive(Clone, Copy, Debug)]
pub enum BRef<'a> {
    Mat(MatRef<'a>),
    Packed(&'a PackedB),
    /// Packed B borrowed in place (e.g. an artifact constant).
    PackedView(PackedView<'a>),
}

impl<'a> BRef<'a> {
    /// Prepacked forms as a view.
    fn packed(self) -> Option<PackedView<'a>> {
        match self {
            BRef::Mat(_) => None,
            BRef::Packed(p) => Some(p.view()),
            BRef::PackedView(v) => Some(v),
        }
    }
}

/// A microkernel: `C[..mr, ..nr] = alpha·Σ_{p<kc} A[i,p]·B[p,j] (+ C if load)` with A packed MR-high
/// (`a[p·MR + i]`), B rows `ldb` apart with NR readable floats each, C rows `ldc` apart.
pub(crate) type KernelFn =
    unsafe fn(usize, usize, usize, *const f32, *const f32, usize, *mut f32, usize, f32, bool);

/// A microkernel reading B's row p at `b + offs[p]` (same contract otherwise).
pub(crate) type GatherFn =
    unsafe fn(usize, usize, usize, *const f32, *const f32, *const usize, *mut f32, usize, f32, bool);

/// Where a microkernel finds row p of B: one generic tile loop serves packed/row-major B
/// ([`Strided`]) and rows gathered in place by an offset table ([`Gathered`]).
pub(crate) trait BRows: Copy {
    /// # Safety
    /// `b` and the addressing cover row `p`.
    unsafe fn at(self, b: *const f32, p: usize) -> *const f32;
}

/// Rows a fixed number of floats apart.
#[derive(Clone, Copy)]
pub(crate) struct Strided(pub usize);

impl BRows for Strided {
    #[inline(always)]
    unsafe fn at(self, b: *const f32, p: usize) -> *const f32 {
        b.add(p * self.0)
    }
}

/// Row p at `b + offs[p]`.
#[derive(Clone, Copy)]
pub(crate) struct Gathered(pub *const usize);

impl BRows for Gathered {
    #[inline(always)]
    unsafe fn at(self, b: *const f32, p: usize) -> *const f32 {
        b.add(*self.0.add(p))
    }
}

/// A kernel family and its blocking.
pub(crate) struct Kernel {
    pub isa: Isa,
    pub mr: usize,
    pub nr: usize,
    /// K slice depth: a KC×NR B sliver stays in L1 across the A panels of a row block.
    pub kc: usize,
    /// Row block height (multiple of mr): an MC×KC packed A block stays in L2.
    pub mc: usize,
    /// Column block width (multiple of nr): a KC×NC packed B block stays in L3 (or L2).
    pub nc: usize,
    pub func: KernelFn,
    pub gather: GatherFn,
}

/// Panel width of an ISA's kernels (fixed per ISA, whatever the build target, so packed weights
/// from another machine are recognized and relaid).
pub(crate) fn nr_for(isa: Isa) -> usize {
    match isa {
        Isa::Scalar => 8,
        Isa::Avx2Fma => 16,
        Isa::Avx512 => 32,
        Isa::Neon => 12,
    }
}

static SCALAR: Kernel = Kernel {
    isa: Isa::Scalar,
    mr: kernel_scalar::MR,
    nr: kernel_scalar::NR,
    kc: 256,
    mc: 128,
    nc: 1024,
    func: kernel_scalar::kernel,
    gather: kernel_scalar::kernel_gather,
};

#[cfg(target_arch = "x86_64")]
static AVX2: Kernel = Kernel {
    isa: Isa::Avx2Fma,
    mr: x86_avx2::MR,
    nr: x86_avx2::NR,
    kc: 256,
    mc: 144,
    nc: 2048,
    func: x86_avx2::kernel,
    gather: x86_avx2::kernel_gather,
};

#[cfg(target_arch = "x86_64")]
static AVX512: Kernel = Kernel {
    isa: Isa::Avx512,
    mr: x86_avx512::MR,
    nr: x86_avx512::NR,
    kc: 256,
    mc: 168,
    nc: 2048,
    func: x86_avx512::kernel,
    gather: x86_avx512::kernel_gather,
};

#[cfg(target_arch = "aarch64")]
static NEON: Kernel = Kernel {
    isa: Isa::Neon,
    mr: arm_neon::MR,
    nr: arm_neon::NR,
    kc: 256,
    mc: 128,
    nc: 1536,
    func: arm_neon::kernel,
    gather: arm_neon::kernel_gather,
};

/// The kernel family for `isa` (scalar for ISAs of another architecture).
pub(crate) fn kernel_for(isa: Isa) -> &'static Kernel {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => &AVX512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => &AVX2,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => &NEON,
        _ => &SCALAR,
    }
}

/// `v = act(v)` in place with the active ISA's vector width (for callers outside GEMM, such as
/// the gate nonlinearities of recurrent layers).
pub fn act_in_place(v: &mut [f32], act: Act) {
    let n = v.len();
    if n == 0 {
        return;
    }
    // SAFETY: one row of n writable floats; the active ISA is supported.
    unsafe { epilogue::apply(isa::active(), v.as_mut_ptr(), n, 1, n, 0, &Epilogue::new(None, act)) };
}

/// `C = alpha·A·B` (`C += alpha·A·B` if `accumulate`), then `C = act(C + bias)`, with the active ISA.
/// A is m×k, B k×n, C m×n row-major with leading dimension `ldc`. `parallel` lets the product use
/// the current rayon pool (pass false when already inside a parallel loop).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    epi: &Epilogue,
    parallel: bool,
) -> Result<()> {
    sgemm_with(isa::active(), m, n, k, a, b, c, ldc, accumulate, epi, parallel)
}

/// Up to this many rows of A, products take the skinny path: B is read in place in any layout.
pub const SKINNY_M: usize = skinny::MAX_M;

/// Up to this many rows of A, a row-major B is read in place instead of packed.
const DIRECT_B_MAX_M: usize = 64;

/// `sgemm` with an explicit ISA (an ISA the CPU lacks falls back to the best available).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    epi: &Epilogue,
    parallel: bool,
) -> Result<()> {
    let isa = if isa.supported() { isa } else { isa::best() };
    check(m, n, k, a, b, c, ldc, epi)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let kern = kernel_for(isa);
    if k == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            if !accumulate {
                row[..n].fill(0.0);
            }
        }
        // SAFETY: check() verified C holds m rows of n floats ldc apart.
        unsafe { epilogue::apply(kern.isa, c.as_mut_ptr(), ldc, m, n, 0, epi) };
        return Ok(());
    }
    if m <= skinny::MAX_M {
        if let Some(sb) = skinny_b(b, kern) {
            run_skinny(kern, m, n, k, a, sb, c, ldc, accumulate, epi, parallel);
            return Ok(());
        }
    }
    let relaid;
    let bsrc = match (b, b.packed()) {
        (_, Some(p)) if p.nr() == kern.nr => BSrc::Packed(p),
        (_, Some(p)) => {
            relaid = p.repack(kern.isa);
            BSrc::Packed(relaid.view())
        }
        // In place when few A panels will stream each B sliver: packing would cost more (measured
        // on Zen 5: 26×384×1536 with AVX2 packs at 90 GFLOP/s, runs in place at 120).
        (BRef::Mat(bm), _) if bm.cs == 1 && m <= DIRECT_B_MAX_M => BSrc::Direct(bm),
        (BRef::Mat(bm), _) => BSrc::Pack(bm),
        (_, None) => unreachable!("packed forms have a view"),
    };
    let job = Job { kern, m, n, k, a, b: bsrc, c: CPtr(c.as_mut_ptr()), ldc, accumulate, epi };
    let threads = if parallel { crate::cpu::par::threads() } else { 1 };
    let (tm, tn) = split(m, n, k, kern, threads);
    if tm * tn <= 1 {
        job.block(0, m, 0, n);
        return Ok(());
    }
    let rows = chunks(m, kern.mr, tm);
    let cols = chunks(n, kern.nr, tn);
    let tasks: Vec<_> = rows.iter().flat_map(|&r| cols.iter().map(move |&c| (r, c))).collect();
    crate::cpu::par::for_each(&tasks, |&((i0, i1), (j0, j1))| job.block(i0, i1, j0, j1));
    Ok(())
}

/// B as the skinny kernels can read it in place, if they can.
fn skinny_b<'a>(b: BRef<'a>, kern: &Kernel) -> Option<skinny::SkinnyB<'a>> {
    match b {
        BRef::Mat(bm) if bm.cs == 1 => Some(skinny::SkinnyB::Rows { data: bm.data, ld: bm.rs }),
        BRef::Mat(bm) if bm.rs == 1 => Some(skinny::SkinnyB::Cols { data: bm.data, ld: bm.cs }),
        _ => match b.packed() {
            Some(p) if p.nr() == kern.nr => Some(skinny::SkinnyB::Panels { data: p.data(), nr: p.nr() }),
            _ => None,
        },
    }
}

/// A skinny product (m ≤ skinny::MAX_M, k > 0), its columns split across the pool when large.
#[allow(clippy::too_many_arguments)]
fn run_skinny(
    kern: &Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: skinny::SkinnyB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    epi: &Epilogue,
    parallel: bool,
) {
    const MIN_TASK: usize = 1 << 17; // multiply-adds: bandwidth-bound, a few µs
    let threads = if parallel { crate::cpu::par::threads() } else { 1 };
    let tasks = threads.min(m * n * k / MIN_TASK).max(1);
    let cp = CPtr(c.as_mut_ptr());
    // SAFETY: sgemm checked the operands; each task writes its own columns of C.
    let go = |(j0, j1): (usize, usize)| unsafe {
        let cp = cp;
        skinny::run(kern.isa, m, k, a, b, cp.0, ldc, j0, j1, accumulate, epi)
    };
    if tasks == 1 {
        go((0, n));
    } else {
        chunks(n, kern.nr * 64usize.div_ceil(kern.nr), tasks).into_par_iter().for_each(go);
    }
}

#[allow(clippy::too_many_arguments)]
fn check(m: usize, n: usize, k: usize, a: MatRef, b: BRef, c: &[f32], ldc: usize, epi: &Epilogue) -> Result<()> {
    let bad = |what: &str| Err(Error::Other(format!("sgemm {m}x{k} · {k}x{n}: {what}")));
    if !a.fits(m, k) {
        return bad("A too small");
    }
    match (b, b.packed()) {
        (BRef::Mat(bm), _) if !bm.fits(k, n) => return bad("B too small"),
        (_, Some(p)) if p.k() != k || p.n() != n => return bad(&format!("packed B is {}x{}", p.k(), p.n())),
        _ => {}
    }
    if m > 0 && n > 0 && (ldc < n || c.len() < (m - 1) * ldc + n) {
        return bad("C too small");
    }
    if epi.bias.is_some_and(|b| b.len() < n) {
        return bad("bias shorter than N");
    }
    Ok(())
}

/// How many row and column chunks to run in parallel: about one per thread when there is enough
/// work, splitting the dimension that keeps the blocks closest to square.
fn split(m: usize, n: usize, k: usize, kern: &Kernel, threads: usize) -> (usize, usize) {
    const MIN_TASK: usize = 1 << 19; // multiply-adds: ~5 µs on one core, well above rayon's cost
    let work = m * n * k;
    let tasks = threads.min(work / MIN_TASK).max(1);
    if tasks == 1 {
        return (1, 1);
    }
    let (mu, nu) = (m.div_ceil(kern.mr), n.div_ceil(kern.nr));
    let mut best = (1, 1);
    let mut best_score = f64::INFINITY;
    for tn in 1..=tasks {
        let tm = tasks / tn;
        if tm * tn != tasks || tm > mu || tn > nu {
            continue;
        }
        let (h, w) = (m as f64 / tm as f64, n as f64 / tn as f64);
        let score = (h / w).max(w / h);
        if score < best_score {
            best_score = score;
            best = (tm, tn);
        }
    }
    best
}

/// `parts` ranges covering `0..len`, boundaries at multiples of `unit`, as even as possible.
fn chunks(len: usize, unit: usize, parts: usize) -> Vec<(usize, usize)> {
    let units = len.div_ceil(unit);
    (0..parts)
        .map(|t| ((t * units / parts * unit).min(len), ((t + 1) * units / parts * unit).min(len)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// Where a kernel reads B from.
enum BSrc<'a> {
    /// Pack each KC×NC block into scratch.
    Pack(MatRef<'a>),
    /// Read full NR-wide panels in place (row-major B); only a ragged last panel is packed.
    Direct(MatRef<'a>),
    /// Prepacked panels covering all of K.
    Packed(PackedView<'a>),
}

#[derive(Clone, Copy)]
struct CPtr(*mut f32);
// SAFETY: tasks write disjoint blocks of C (see `Job::block`).
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

struct Job<'a> {
    kern: &'static Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'a>,
    b: BSrc<'a>,
    c: CPtr,
    ldc: usize,
    accumulate: bool,
    epi: &'a Epilogue<'a>,
}

thread_local! {
    /// Packing scratch (A block, B block), reused across calls on this thread.
    static SCRATCH: RefCell<(AlignedBuf, AlignedBuf)> = RefCell::new(Default::default());
}

impl Job<'_> {
    /// C[i0..i1, j0..j1] on this thread. Blocks of different calls never overlap; j0 is a multiple
    /// of NR (prepacked panels are addressed by column).
    fn block(&self, i0: usize, i1: usize, j0: usize, j1: usize) {
        debug_assert!(i1 <= self.m && j1 <= self.n && j0.is_multiple_of(self.kern.nr));
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let (abuf, bbuf) = &mut *s;
            let Kernel { kc, mc, nc, mr, .. } = *self.kern;
            let abuf = abuf.get(mc * kc);
            let bbuf = bbuf.get(kc * nc);
            let mut jc = j0;
            while jc < j1 {
                let ncb = nc.min(j1 - jc);
                let mut pc = 0;
                while pc < self.k {
                    let kcb = kc.min(self.k - pc);
                    let bsl = self.b_slice(bbuf, pc, kcb, jc, ncb);
                    let mut ic = i0;
                    while ic < i1 {
                        let mcb = mc.min(i1 - ic);
                        pack::pack_a(abuf, self.a, ic, mcb, pc, kcb, mr, self.kern.isa);
                        self.macro_kernel(abuf, &bsl, ic, mcb, jc, ncb, pc, kcb);
                        ic += mcb;
                    }
                    pc += kcb;
                }
                jc += ncb;
            }
        });
    }

    /// Where the B panels of columns jc..jc+ncb, rows pc..pc+kcb are (packing them if needed).
    fn b_slice(&self, bbuf: &mut [f32], pc: usize, kcb: usize, jc: usize, ncb: usize) -> BSlice {
        let nr = self.kern.nr;
        match self.b {
            BSrc::Pack(bm) => {
                pack::pack_b(bbuf, bm, pc, kcb, jc, ncb, nr);
                BSlice { base: bbuf.as_ptr(), panel_step: kcb * nr, ldb: nr, full: ncb.div_ceil(nr), tail: std::ptr::null() }
            }
            BSrc::Packed(p) => {
                let k = p.k();
                // SAFETY: panel jc/nr exists and holds k·nr floats; pc < k.
                let base = unsafe { p.data().as_ptr().add((jc / nr) * k * nr + pc * nr) };
                BSlice { base, panel_step: k * nr, ldb: nr, full: ncb.div_ceil(nr), tail: std::ptr::null() }
            }
            BSrc::Direct(bm) => {
                let full = ncb / nr;
                let mut tail = std::ptr::null();
                if full * nr < ncb {
                    pack::pack_b(bbuf, bm, pc, kcb, jc + full * nr, ncb - full * nr, nr);
                    tail = bbuf.as_ptr();
                }
                // SAFETY: row pc, column jc lie inside B (checked by sgemm).
                let base = unsafe { bm.data.as_ptr().add(pc * bm.rs + jc) };
                BSlice { base, panel_step: nr, ldb: bm.rs, full, tail }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn macro_kernel(&self, abuf: &[f32], b: &BSlice, ic: usize, mcb: usize, jc: usize, ncb: usize, pc: usize, kcb: usize) {
        let Kernel { mr, nr, func, isa, .. } = *self.kern;
        let load = self.accumulate || pc > 0;
        let last = pc + kcb == self.k;
        let panels = ncb.div_ceil(nr);
        for q in 0..panels {
            let nrq = nr.min(ncb - q * nr);
            let (bp, ldb) = if q < b.full {
                (b.base.wrapping_add(q * b.panel_step), b.ldb)
            } else {
                (b.tail, nr)
            };
            let mut ir = 0;
            while ir < mcb {
                let mrq = mr.min(mcb - ir);
                // SAFETY: the packed A panel holds kcb·mr floats; B and C ranges were checked by
                // sgemm and lie in this task's block of C.
                unsafe {
                    let cp = self.c.0.add((ic + ir) * self.ldc + jc + q * nr);
                    func(mrq, nrq, kcb, abuf.as_ptr().add(ir * kcb), bp, ldb, cp, self.ldc, self.epi.alpha, load);
                    if last {
                        epilogue::apply(isa, cp, self.ldc, mrq, nrq, jc + q * nr, self.epi);
                    }
                }
                ir += mr;
            }
        }
    }
}

/// The B panels of one KC×NC block: panel q < full at `base + q·panel_step` with rows `ldb` apart,
/// the ragged last panel (Direct only) at `tail`.
struct BSlice {
    base: *const f32,
    panel_step: usize,
    ldb: usize,
    full: usize,
    tail: *const f32,
}
