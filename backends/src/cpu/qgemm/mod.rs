//! Our int8 GEMM: u8 activations × i8 weights → i32, with dequantization, bias and activation fused
//! into the epilogue (f32 out), per-ISA microkernels chosen at run time, rayon over tiles.
//!
//! Weights are quantized and packed once (at compile time) into 16-column panels laid out for
//! `vpdpbusd`: for each group of 4 consecutive k, 16 columns × 4 bytes (one zmm, or two ymm). That
//! layout does not depend on the ISA, so one artifact runs on every machine. K is padded to a multiple
//! of 4 and N to a multiple of 16 with zero weights, which is why A rows only need to be *readable*
//! up to the padded K (their padding bytes multiply zeros).
//!
//! Activations are asymmetric u8 (`a ≈ sa·(q − za)`), with one (scale, zero point) per row (dynamic
//! quantization) or the same for every row (static). With symmetric per-column weights
//! (`w ≈ sw[j]·q`), `Σ a·w ≈ sa·sw[j]·(Σ qa·qw − za·Σ_k qw[k,j])`: the zero point costs one
//! multiply-add per output against the per-column weight sums stored with the packed weights.
//!
//! Kernels: AVX-512 VNNI (`vpdpbusd` zmm), AVX-VNNI (ymm), plain AVX2 (the u8×i8 dot product done
//! exactly with `vpmaddwd` on even and odd bytes, so no `vpmaddubsw` saturation), and scalar.

mod kernel_scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

use kiln_runtime::{Error, Result};
use rayon::prelude::*;

use crate::cpu::gemm::{apply_act, apply_act_fma, Act};
use crate::cpu::isa::{self, Isa};

/// Columns per packed panel.
pub const PANEL: usize = 16;
/// Bytes of one k group of one panel (16 columns × 4 k).
const GROUP: usize = PANEL * 4;
/// Widest register tile (columns) of any kernel: the accumulator buffer's row length.
const TILE_N: usize = 2 * PANEL;
/// Tallest register tile (rows) of any kernel.
const TILE_M: usize = 8;
/// Largest K for which the product and the zero-point correction (each up to K·255·127) stay
/// inside i32.
pub const MAX_K: usize = 32_768;

/// K rounded up to the packed depth (a multiple of 4).
pub fn padded_k(k: usize) -> usize {
    k.div_ceil(4) * 4
}

/// Bytes of a packed K×N weight matrix.
pub fn packed_len(k: usize, n: usize) -> usize {
    n.div_ceil(PANEL) * padded_k(k) * PANEL
}

/// Int8 weights ready for `qgemm`: packed panels, per-column scales and per-column sums of the
/// quantized values (for the activation zero point).
#[derive(Clone, Debug, PartialEq)]
pub struct QWeights {
    pub k: usize,
    pub n: usize,
    pub packed: Vec<u8>,
    pub scale: Vec<f32>,
    pub sum: Vec<i32>,
}

impl QWeights {
    /// The int8 values as a row-major K×N matrix (the packing undone).
    pub fn unpacked(&self) -> Vec<i8> {
        let kg = padded_k(self.k) / 4;
        let mut q = vec![0i8; self.k * self.n];
        for p in 0..self.k {
            for j in 0..self.n {
                q[p * self.n + j] = self.packed[((j / PANEL) * kg + p / 4) * GROUP + (j % PANEL) * 4 + p % 4] as i8;
            }
        }
        q
    }
}

/// Quantize a K×N f32 weight matrix (element (p, j) at `w[p·rs + j·cs]`) symmetrically per column
/// to [-127, 127] and pack it.
pub fn quantize_weights(w: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Result<QWeights> {
    if k > MAX_K || (k > 0 && n > 0 && (k - 1) * rs + (n - 1) * cs >= w.len()) {
        return Err(Error::Shape(format!("int8 weights {k}x{n}: data too small or K too large")));
    }
    let mut q = vec![0i8; k * n];
    let mut scale = vec![0f32; n];
    for j in 0..n {
        if (0..k).any(|p| !w[p * rs + j * cs].is_finite()) {
            return Err(Error::Other(format!("int8 weights: column {j} is not finite")));
        }
        let amax = (0..k).map(|p| w[p * rs + j * cs].abs()).fold(0f32, f32::max);
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        scale[j] = s;
        for p in 0..k {
            q[p * n + j] = (w[p * rs + j * cs] / s).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
    let (packed, sum) = pack_i8(&q, k, n);
    Ok(QWeights { k, n, packed, scale, sum })
}

/// Pack a row-major K×N i8 matrix into panels; also returns the column sums.
pub fn pack_i8(q: &[i8], k: usize, n: usize) -> (Vec<u8>, Vec<i32>) {
    let kg = padded_k(k) / 4;
    let mut packed = vec![0u8; packed_len(k, n)];
    let mut sum = vec![0i32; n];
    for j in 0..n {
        let (panel, c) = (j / PANEL, j % PANEL);
        for p in 0..k {
            let v = q[p * n + j];
            sum[j] += v as i32;
            packed[(panel * kg + p / 4) * GROUP + c * 4 + p % 4] = v as u8;
        }
    }
    (packed, sum)
}

/// Packed weights as `qgemm` reads them.
#[derive(Clone, Copy, Debug)]
pub struct PackedRef<'a> {
    pub k: usize,
    pub n: usize,
    pub packed: &'a [u8],
    pub scale: &'a [f32],
    pub sum: &'a [i32],
}

impl<'a> From<&'a QWeights> for PackedRef<'a> {
    fn from(w: &'a QWeights) -> Self {
        PackedRef { k: w.k, n: w.n, packed: &w.packed, scale: &w.scale, sum: &w.sum }
    }
}

/// Quantized activations: M rows of u8 `ld` bytes apart (each readable up to the padded K), with
/// per-row scales and zero points (slices of length 1 mean "the same for every row").
#[derive(Clone, Copy, Debug)]
pub struct QActs<'a> {
    pub data: &'a [u8],
    pub ld: usize,
    pub scale: &'a [f32],
    pub zero: &'a [i32],
}

/// What happens after the integer product: `act(dequantized + bias[j])`.
#[derive(Clone, Copy, Debug)]
pub struct QEpilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub act: Act,
}

/// Where the f32 result goes: element (i, j) at `data[i·rs + j·cs]` (cs = 1 row-major, rs = 1 for
/// the transposed layout a Conv in NCHW wants).
pub struct Out<'a> {
    pub data: &'a mut [f32],
    pub rs: usize,
    pub cs: usize,
}

/// (scale, zero point) of the asymmetric u8 quantization covering [lo, hi] (widened to hold 0).
pub fn u8_params(lo: f32, hi: f32) -> (f32, i32) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    if !(hi - lo).is_finite() || hi - lo <= 0.0 {
        return (1.0, 0);
    }
    let scale = (hi - lo) / 255.0;
    let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as i32;
    (scale, zero)
}

/// `dst[i] = clamp(round(src[i]/scale) + zero, 0, 255)` (NaN gives 0).
pub fn quantize_u8(src: &[f32], dst: &mut [u8], scale: f32, zero: i32) {
    let (inv, z) = (1.0 / scale, zero as f32);
    isa::with_isa(#[inline(always)] || {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = q_u8(x, inv, z);
        }
    })
}

/// `quantize_u8` with a multiplier per element of each row (`mul`, as long as a row): the
/// static-int8 smoothing factors, applied on the way in at no extra pass over memory.
pub fn quantize_u8_scaled(src: &[f32], mul: &[f32], dst: &mut [u8], scale: f32, zero: i32) {
    let (inv, z) = (1.0 / scale, zero as f32);
    isa::with_isa(#[inline(always)] || {
        for ((d, &x), &m) in dst.iter_mut().zip(src).zip(mul) {
            *d = q_u8(x * m, inv, z);
        }
    })
}

/// One element of `quantize_u8` (with `inv` = 1/scale): branch-free so that loops calling it
/// vectorise. The clamp comes first (as selects: NaN fails `v > 0` and becomes 0) so the value is in
/// [0, 255]; adding 2²³ then rounds it to the nearest integer, ties to even (like
/// `round_ties_even`), and leaves that integer in the low mantissa bits.
#[inline(always)]
pub(crate) fn q_u8(x: f32, inv: f32, z: f32) -> u8 {
    const MAGIC: f32 = 8_388_608.0;
    let v = x * inv + z;
    let v = if v > 0.0 { v } else { 0.0 };
    let v = if v < 255.0 { v } else { 255.0 };
    (v + MAGIC).to_bits() as u8
}

/// (min, max) of a slice with 0 included, ignoring NaN.
#[inline(always)]
fn min_max0(src: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if Isa::Avx512.supported() {
            // SAFETY: AVX-512F is available.
            return unsafe { x86::min_max0_avx512(src) };
        }
    }
    // A NaN x fails both comparisons and is skipped.
    src.iter().fold((0f32, 0f32), |(lo, hi), &x| (if x < lo { x } else { lo }, if x > hi { x } else { hi }))
}

/// Quantize each of the `m` rows of a row-major M×K f32 matrix with its own range: returns the u8
/// rows (`padded_k(k)` apart, padding zero), scales and zero points.
pub fn quantize_rows(a: &[f32], m: usize, k: usize) -> (Vec<u8>, Vec<f32>, Vec<i32>) {
    let ld = padded_k(k);
    let mut q = vec![0u8; m * ld];
    let mut scale = vec![0f32; m];
    let mut zero = vec![0i32; m];
    let row = |(i, ((dst, s), z)): (usize, ((&mut [u8], &mut f32), &mut i32))| {
        isa::with_isa(#[inline(always)] || {
            let src = &a[i * k..(i + 1) * k];
            let (lo, hi) = min_max0(src);
            let (sc, zp) = u8_params(lo, hi);
            let (inv, zf) = (1.0 / sc, zp as f32);
            for (d, &x) in dst[..k].iter_mut().zip(src) {
                *d = q_u8(x, inv, zf);
            }
            *s = sc;
            *z = zp;
        })
    };
    let it = q.chunks_mut(ld.max(1)).zip(scale.iter_mut()).zip(zero.iter_mut());
    if m * k >= 1 << 16 {
        it.enumerate().par_bridge().for_each(row);
    } else {
        it.enumerate().for_each(row);
    }
    (q, scale, zero)
}

/// The microkernel families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QKernel {
    Scalar,
    /// AVX2 without VNNI: exact u8×i8 products through `vpmaddwd`.
    Avx2,
    /// AVX-VNNI: `vpdpbusd` on ymm.
    AvxVnni,
    /// AVX-512 VNNI: `vpdpbusd` on zmm.
    Avx512Vnni,
}

impl QKernel {
    /// The best kernel for `isa` on this CPU.
    pub fn for_isa(isa: Isa) -> QKernel {
        #[cfg(target_arch = "x86_64")]
        {
            let vnni512 = std::is_x86_feature_detected!("avx512vnni");
            let avxvnni = std::is_x86_feature_detected!("avxvnni");
            match isa {
                Isa::Avx512 if vnni512 => return QKernel::Avx512Vnni,
                Isa::Avx512 | Isa::Avx2Fma if avxvnni && isa.supported() => return QKernel::AvxVnni,
                Isa::Avx512 | Isa::Avx2Fma if isa.supported() => return QKernel::Avx2,
                _ => {}
            }
        }
        let _ = isa;
        QKernel::Scalar
    }

    /// Every kernel this CPU can run (for tests and benchmarks).
    pub fn available() -> Vec<QKernel> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut v = vec![QKernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::Avx2Fma.supported() {
                v.push(QKernel::Avx2);
            }
            if Isa::Avx2Fma.supported() && std::is_x86_feature_detected!("avxvnni") {
                v.push(QKernel::AvxVnni);
            }
            if Isa::Avx512.supported() && std::is_x86_feature_detected!("avx512vnni") {
                v.push(QKernel::Avx512Vnni);
            }
        }
        v
    }

    /// The float ISA the epilogue of this kernel runs on.
    fn float_isa(self) -> Isa {
        match self {
            QKernel::Scalar => Isa::Scalar,
            QKernel::Avx2 | QKernel::AvxVnni => Isa::Avx2Fma,
            QKernel::Avx512Vnni => Isa::Avx512,
        }
    }

    /// (rows, panels) of the register tile.
    fn tile(self) -> (usize, usize) {
        match self {
            QKernel::Scalar => (4, 1),
            QKernel::Avx2 | QKernel::AvxVnni => (4, 1),
            QKernel::Avx512Vnni => (8, 2),
        }
    }

    /// `acc[i·TILE_N + j] = Σ_p A[i, p]·B[p, j]` for i < mr, j < 16·np, over `kg` groups of 4 k.
    ///
    /// # Safety
    /// The kernel's ISA is available; `a` covers mr rows of 4·kg bytes `lda` apart; `b` covers np
    /// panels of kg groups (`b_step` bytes apart); mr ≤ the tile rows, np ≤ its panels.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(self, mr: usize, np: usize, kg: usize, a: *const u8, lda: usize, b: *const u8, b_step: usize, acc: &mut [i32; TILE_M * TILE_N]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            QKernel::Avx512Vnni => x86::kernel_avx512vnni(mr, np, kg, a, lda, b, b_step, acc),
            #[cfg(target_arch = "x86_64")]
            QKernel::AvxVnni => x86::kernel_avxvnni(mr, kg, a, lda, b, acc),
            #[cfg(target_arch = "x86_64")]
            QKernel::Avx2 => x86::kernel_avx2(mr, kg, a, lda, b, acc),
            _ => kernel_scalar::kernel(mr, np, kg, a, lda, b, b_step, acc),
        }
    }
}

/// `out = act(dequant(A·W) + bias)` with the active ISA. A is M×K (quantized), W packed K×N.
pub fn qgemm(m: usize, a: QActs, w: PackedRef, epi: &QEpilogue, out: Out, parallel: bool) -> Result<()> {
    qgemm_with(QKernel::for_isa(isa::active()), m, a, w, epi, out, parallel)
}

/// Rows of A per block: a block's A rows stay in L2 while every column panel streams past.
const MC: usize = 64;

/// `qgemm` with an explicit kernel.
pub fn qgemm_with(kern: QKernel, m: usize, a: QActs, w: PackedRef, epi: &QEpilogue, out: Out, parallel: bool) -> Result<()> {
    // SAFETY: the pointer and length come from one exclusive slice.
    unsafe { qgemm_raw(kern, m, a, w, epi, out.data.as_mut_ptr(), out.data.len(), out.rs, out.cs, parallel) }
}

/// `qgemm_with` writing through a raw pointer, for callers whose concurrent tasks write
/// interleaved parts of one output (a Conv's pixel chunks of every output channel).
///
/// # Safety
/// `out` is valid for writes of `len` floats and no one else reads or writes the elements
/// `i·rs + j·cs` (i < m, j < N) during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn qgemm_raw(kern: QKernel, m: usize, a: QActs, w: PackedRef, epi: &QEpilogue, out: *mut f32, len: usize, rs: usize, cs: usize, parallel: bool) -> Result<()> {
    check(m, &a, &w, epi, len, rs, cs)?;
    let n = w.n;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (mr, np) = kern.tile();
    let cols = np * PANEL;
    let row_blocks = m.div_ceil(MC);
    let col_blocks = n.div_ceil(cols);
    let job = Job { kern, a, w, epi, out: OutPtr(out), rs, cs, mr, np, m };
    // Tasks: MC-row blocks × column chunks, about 4 per thread when there is enough work.
    let threads = if parallel { crate::cpu::par::threads() } else { 1 };
    let work = m * n * padded_k(w.k);
    let want = (threads * 4).min(work >> 18).max(1);
    if threads <= 1 || want <= 1 {
        job.block(0, m, 0, col_blocks);
        return Ok(());
    }
    let col_chunks = want.div_ceil(row_blocks).min(col_blocks).max(1);
    let tasks: Vec<(usize, usize)> = (0..row_blocks).flat_map(|r| (0..col_chunks).map(move |c| (r, c))).collect();
    tasks.par_iter().for_each(|&(r, c)| {
        let (c0, c1) = (c * col_blocks / col_chunks, (c + 1) * col_blocks / col_chunks);
        job.block(r * MC, ((r + 1) * MC).min(m), c0, c1);
    });
    Ok(())
}

fn check(m: usize, a: &QActs, w: &PackedRef, epi: &QEpilogue, len: usize, rs: usize, cs: usize) -> Result<()> {
    let (k, n) = (w.k, w.n);
    let bad = |what: &str| Err(Error::Shape(format!("qgemm {m}x{k} · {k}x{n}: {what}")));
    let kp = padded_k(k);
    if k > MAX_K {
        return bad("K too large for i32 accumulation");
    }
    if w.packed.len() != packed_len(k, n) || w.scale.len() != n || w.sum.len() != n {
        return bad("packed weights do not match K, N");
    }
    if m > 0 && (a.ld < kp || a.data.len() < (m - 1) * a.ld + kp) {
        return bad("A too small");
    }
    for (len, what) in [(a.scale.len(), "A scales"), (a.zero.len(), "A zero points")] {
        if len != 1 && len != m {
            return bad(what);
        }
    }
    if epi.bias.is_some_and(|b| b.len() != n) {
        return bad("bias length is not N");
    }
    if m > 0 && n > 0 && (m - 1) * rs + (n - 1) * cs >= len {
        return bad("output too small");
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (row block, column chunk) parts of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

struct Job<'a> {
    kern: QKernel,
    a: QActs<'a>,
    w: PackedRef<'a>,
    epi: &'a QEpilogue<'a>,
    out: OutPtr,
    rs: usize,
    cs: usize,
    mr: usize,
    np: usize,
    m: usize,
}

impl Job<'_> {
    /// Rows i0..i1 × column blocks (of np panels) c0..c1.
    fn block(&self, i0: usize, i1: usize, c0: usize, c1: usize) {
        let kg = padded_k(self.w.k) / 4;
        let panel_bytes = kg * GROUP;
        let n = self.w.n;
        let mut acc = [0i32; TILE_M * TILE_N];
        for cb in c0..c1 {
            let p0 = cb * self.np;
            let np = self.np.min(n.div_ceil(PANEL) - p0);
            let j0 = p0 * PANEL;
            let nc = (np * PANEL).min(n - j0);
            let mut i = i0;
            while i < i1 {
                let mr = self.mr.min(i1 - i);
                // SAFETY: check() verified A holds m rows readable to the padded K and the packed
                // weights hold every panel; this task owns rows i0..i1 of columns c0..c1.
                unsafe {
                    let b = self.w.packed.as_ptr().add(p0 * panel_bytes);
                    self.kern.run(mr, np, kg, self.a.data.as_ptr().add(i * self.a.ld), self.a.ld, b, panel_bytes, &mut acc);
                    self.store(&acc, i, mr, j0, nc);
                }
                i += mr;
            }
        }
        debug_assert!(i1 <= self.m);
    }

    /// Dequantize a tile, add bias, apply the activation and write it out (rows, or for the
    /// transposed layout columns of mr consecutive floats), vectorised for the kernel's ISA.
    ///
    /// # Safety
    /// Rows i..i+mr and columns j0..j0+nc are inside the checked output and owned by this task.
    unsafe fn store(&self, acc: &[i32; TILE_M * TILE_N], i: usize, mr: usize, j0: usize, nc: usize) {
        isa::with_isa_of(self.kern.float_isa(), #[inline(always)] || self.store_tile(acc, i, mr, j0, nc))
    }

    #[inline(always)]
    unsafe fn store_tile(&self, acc: &[i32; TILE_M * TILE_N], i: usize, mr: usize, j0: usize, nc: usize) {
        let (a, w) = (&self.a, &self.w);
        // The whole tile, rows nc apart, goes through the activation in one call: a polynomial
        // activation is a long dependency chain per vector, and one row holds only two vectors,
        // too few for the core to overlap.
        let mut tile = [0f32; TILE_M * TILE_N];
        let (ws, wsum) = (&w.scale[j0..j0 + nc], &w.sum[j0..j0 + nc]);
        let bias = self.epi.bias.map(|b| &b[j0..j0 + nc]);
        for r in 0..mr {
            let ii = i + r;
            let sa = a.scale[if a.scale.len() == 1 { 0 } else { ii }];
            let za = a.zero[if a.zero.len() == 1 { 0 } else { ii }];
            let row = &mut tile[r * nc..(r + 1) * nc];
            let accr = &acc[r * TILE_N..r * TILE_N + nc];
            match bias {
                Some(b) => {
                    for c in 0..nc {
                        row[c] = (accr[c] - za * wsum[c]) as f32 * (sa * ws[c]) + b[c];
                    }
                }
                None => {
                    for c in 0..nc {
                        row[c] = (accr[c] - za * wsum[c]) as f32 * (sa * ws[c]);
                    }
                }
            }
        }
        // The float ISAs of the integer kernels other than scalar all have FMA.
        if self.kern.float_isa() == Isa::Scalar {
            apply_act(&mut tile[..mr * nc], self.epi.act);
        } else {
            apply_act_fma(&mut tile[..mr * nc], self.epi.act);
        }
        let base = self.out.0.add(i * self.rs + j0 * self.cs);
        if self.cs == 1 {
            for r in 0..mr {
                std::ptr::copy_nonoverlapping(tile.as_ptr().add(r * nc), base.add(r * self.rs), nc);
            }
        } else {
            for c in 0..nc {
                let col = base.add(c * self.cs);
                for r in 0..mr {
                    *col.add(r * self.rs) = tile[r * nc + c];
                }
            }
        }
    }
}
