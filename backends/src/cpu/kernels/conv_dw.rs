//! Channel-blocked f32 depthwise convolution (1-D / 2-D geometry, one input channel per group).
//!
//! The plane-by-plane kernel in `conv.rs` vectorizes along output rows, which leaves narrow
//! planes to its scalar tail and reads stride-2 columns strided. Here the vectors run across
//! channels instead: for each block of CB = 16 input channels of one image, input rows are
//! interleaved into a channel-last ring of padded rows `[row][col][CB]` (zeros for the padding),
//! the block's weights are transposed to `[tap][CB]`, and every output pixel accumulates all taps
//! as CB-lane vectors, several pixels of a row at a time so each weight vector load serves
//! several multiply-adds, the bias being the accumulators' initial value. Every few output rows
//! the `[pixel][CB]` results are transposed back into the block's NCHW output planes, where the
//! activation runs while they are in L1. The transposes are register transposes (16×16 under
//! AVX-512, 8×8 under AVX2), plain loops elsewhere.
//!
//! A channel multiplier M = mult·C is served by the same input block: output channel `c·mult + k`
//! reads input channel `c`, and every `k` has its own weights, bias and result rows. Blocks are
//! the parallel tasks; when there are too few of them for the threads, they are also split into
//! bands of output rows (each task interleaves the input rows its band reads).

use rayon::prelude::*;

use super::conv::{madd, with_scratch, ConvShape, PAR_MIN_WORK};
use crate::cpu::gemm::pack::AlignedBuf;
#[cfg(target_arch = "x86_64")]
use crate::cpu::gemm::pack::transpose16x16;
use crate::cpu::gemm::{apply_act, Act};
use crate::cpu::isa::Isa;

/// Channels per block: one 512-bit vector (two 256-bit ones, four 128-bit ones).
const CB: usize = 16;
/// Output pixels per flush to the output planes (rounded up to whole rows).
const FLUSH_PIXELS: usize = 256;

/// Geometry of the 2-D (H, W) problem; 1-D convolutions have unit H.
#[derive(Clone, Copy)]
struct Dw {
    ih: usize,
    iw: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    pt: usize,
    pl: usize,
    /// Padded columns the windows read.
    cols: usize,
}

/// Whether the blocked kernel beats `conv.rs`'s row kernel for this 1-D / 2-D depthwise
/// convolution under `isa`. Rule: output width `ow ≤ 8·lanes·min(C, 16)/16`, lanes being the f32s
/// per vector (16 AVX-512, 8 AVX2, 4 NEON and scalar): with 16+ channels ow ≤ 128 on AVX-512,
/// 64 on AVX2, 32 otherwise; proportionally less with fewer channels, whose block leaves lanes
/// idle. Why: the row kernel vectorizes along output rows in 16-column blocks with a scalar tail,
/// so its speed grows with the width, while the blocked kernel's cost per output (a transpose in
/// and out plus the taps) does not depend on it. Measured with the `conv` micro-bench (3×3 and
/// 5×5, strides 1 and 2, planes 7² to 320², 1 to 16+ channels, 1 and 2 threads): below the limit
/// the blocked kernel is generally 1.2–13× faster, around it the two are even, beyond it the row
/// kernel wins (by up to 2× on AVX2 and scalar). 5×5 kernels and stride-2 columns favour the
/// blocked kernel somewhat past the limit; ignored for simplicity. NEON is not measured.
pub(super) fn suits(isa: Isa, s: &ConvShape) -> bool {
    let lanes = match isa {
        Isa::Avx512 => 16,
        Isa::Avx2Fma => 8,
        Isa::Neon | Isa::Scalar => 4,
    };
    s.geo.output[2] * CB <= 8 * lanes * s.c.min(CB)
}

/// One task: channel block `c0..c0+h` of image `b`, output rows `rows`, and the block's `mult·h`
/// output planes restricted to those rows.
struct Task<'a> {
    b: usize,
    c0: usize,
    rows: (usize, usize),
    planes: Vec<&'a mut [f32]>,
}

/// `y = act(depthwise(x, w) + bias)` with the kernels of `isa` (a supported ISA). Buffers as for
/// `conv.rs`'s `depthwise_2d_f32`: x [N, C, H, W], w [M, 1, kh, kw], y [N, M, oh, ow], M = mult·C.
pub(super) fn depthwise_blocked_f32(isa: Isa, s: &ConvShape, x: &[f32], w: &[f32], bias: Option<&[f32]>, act: Act, y: &mut [f32]) {
    let g = &s.geo;
    if y.is_empty() {
        return;
    }
    let d = Dw {
        ih: g.input[1],
        iw: g.input[2],
        oh: g.output[1],
        ow: g.output[2],
        kh: g.kernel[1],
        kw: g.kernel[2],
        sh: g.stride[1],
        sw: g.stride[2],
        dh: g.dilation[1],
        dw: g.dilation[2],
        pt: g.pad[1],
        pl: g.pad[2],
        cols: (g.output[2] - 1) * g.stride[2] + (g.kernel[2] - 1) * g.dilation[2] + 1,
    };
    let (insz, outsz, ksz) = (d.ih * d.iw, d.oh * d.ow, d.kh * d.kw);
    let mult = s.m / s.c;
    let blocks = s.n * s.c.div_ceil(CB);
    let threads = crate::cpu::par::threads();
    let par = threads > 1 && y.len() * ksz >= PAR_MIN_WORK;
    // Bands of output rows per block: about two tasks per thread when blocks are fewer.
    let band_rows = d.oh.div_ceil(if par { (2 * threads).div_ceil(blocks).min(d.oh) } else { 1 });
    let bands = d.oh.div_ceil(band_rows);
    let mut tasks: Vec<Task> = Vec::with_capacity(blocks * bands);
    for (b, yb) in y.chunks_mut(s.m * outsz).enumerate() {
        for (blk, yc) in yb.chunks_mut(CB * mult * outsz).enumerate() {
            let first = tasks.len();
            for r in 0..bands {
                let rows = (r * band_rows, ((r + 1) * band_rows).min(d.oh));
                tasks.push(Task { b, c0: blk * CB, rows, planes: Vec::with_capacity(CB * mult) });
            }
            for plane in yc.chunks_mut(outsz) {
                for (r, seg) in plane.chunks_mut(band_rows * d.ow).enumerate() {
                    tasks[first + r].planes.push(seg);
                }
            }
        }
    }
    let run = |t: &mut Task, ring: &mut AlignedBuf, tile: &mut AlignedBuf| {
        let h = CB.min(s.c - t.c0);
        let args = Block {
            d: &d,
            mult,
            x: &x[(t.b * s.c + t.c0) * insz..][..h * insz],
            w: &w[t.c0 * mult * ksz..][..h * mult * ksz],
            bias: bias.map(|bv| &bv[t.c0 * mult..][..h * mult]),
            act,
        };
        channel_block(isa, &args, t.rows, &mut t.planes, ring, tile);
    };
    if par {
        let min_len = (PAR_MIN_WORK / 16 / (CB * mult * band_rows * d.ow * ksz).max(1)).max(1);
        tasks.par_iter_mut().with_min_len(min_len).for_each(|t| with_scratch(|ring, tile| run(t, ring, tile)));
    } else {
        with_scratch(|ring, tile| tasks.iter_mut().for_each(|t| run(t, ring, tile)));
    }
}

/// One task's operands: a block of `h ≤ CB` input channels (`x` holds their planes) and their
/// `mult·h` weights and biases.
struct Block<'a> {
    d: &'a Dw,
    mult: usize,
    x: &'a [f32],
    w: &'a [f32],
    bias: Option<&'a [f32]>,
    act: Act,
}

/// Output rows `rows` of one channel block into its `planes` (output channel `l·mult + k` at
/// index `l·mult + k`, each holding just those rows) with the kernels of `isa`; `ring_buf` and
/// `tile_buf` are scratch.
fn channel_block(
    isa: Isa,
    b: &Block,
    rows: (usize, usize),
    planes: &mut [&mut [f32]],
    ring_buf: &mut AlignedBuf,
    tile_buf: &mut AlignedBuf,
) {
    match isa {
        // SAFETY: `isa` is the active ISA, which the CPU supports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { channel_block_avx512(b, rows, planes, ring_buf, tile_buf) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { channel_block_avx2(b, rows, planes, ring_buf, tile_buf) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => channel_block_body::<true, 4>(isa, b, rows, planes, ring_buf, tile_buf),
        _ => channel_block_body::<false, 4>(isa, b, rows, planes, ring_buf, tile_buf),
    }
}

/// 32 vector registers: 8 pixels of accumulators keep both FMA pipes busy (4-cycle latency).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn channel_block_avx512(
    b: &Block,
    rows: (usize, usize),
    planes: &mut [&mut [f32]],
    ring_buf: &mut AlignedBuf,
    tile_buf: &mut AlignedBuf,
) {
    channel_block_body::<true, 8>(Isa::Avx512, b, rows, planes, ring_buf, tile_buf)
}

/// 16 registers of 8 lanes: 4 pixels of accumulators take half of them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn channel_block_avx2(
    b: &Block,
    rows: (usize, usize),
    planes: &mut [&mut [f32]],
    ring_buf: &mut AlignedBuf,
    tile_buf: &mut AlignedBuf,
) {
    channel_block_body::<true, 4>(Isa::Avx2Fma, b, rows, planes, ring_buf, tile_buf)
}

/// `channel_block` with FMA or not and `PB` output pixels per register block.
#[inline(always)]
fn channel_block_body<const FMA: bool, const PB: usize>(
    isa: Isa,
    b: &Block,
    (r0, r1): (usize, usize),
    planes: &mut [&mut [f32]],
    ring_buf: &mut AlignedBuf,
    tile_buf: &mut AlignedBuf,
) {
    let (d, mult) = (b.d, b.mult);
    let (insz, ksz) = (d.ih * d.iw, d.kh * d.kw);
    let h = b.x.len() / insz;
    assert!(planes.len() == h * mult && planes.iter().all(|p| p.len() == (r1 - r0) * d.ow));
    // Ring of the eff_kh padded channel-last rows one output row reads: padded row r in slot
    // r % eff_kh.
    let eff_kh = (d.kh - 1) * d.dh + 1;
    let slot_len = d.cols * CB;
    // Output rows per flush and their pixels.
    let out_rows = FLUSH_PIXELS.div_ceil(d.ow).clamp(1, r1 - r0);
    let flush_len = out_rows * d.ow * CB;
    let (ring, rest) = ring_buf.get(eff_kh * slot_len + mult * (ksz + 1) * CB).split_at_mut(eff_kh * slot_len);
    let (wt, bt) = rest.split_at_mut(mult * ksz * CB);
    let res = tile_buf.get(mult * flush_len);
    // Weights as [k][tap][CB] and bias as [k][CB] (output channel l·mult + k in lane l); lanes
    // past h are zero.
    bt.fill(0.0);
    for k in 0..mult {
        interleave(isa, &b.w[k * ksz..], mult * ksz, h, &mut wt[k * ksz * CB..][..ksz * CB]);
        for l in 0..h {
            bt[k * CB + l] = b.bias.map_or(0.0, |bv| bv[l * mult + k]);
        }
    }
    // Columns pl..pl+iw of a padded row hold the input row, clipped to `cols`; the padding
    // columns stay zero in every slot.
    let (ca, cb) = (d.pl.min(d.cols), (d.pl + d.iw).min(d.cols));
    ring.fill(0.0);
    let mut offs = vec![0; d.kh]; // ring offsets of the current output row's kernel rows
    let mut next = 0; // next padded input row to interleave
    let mut o0 = r0;
    while o0 < r1 {
        let nrows = out_rows.min(r1 - o0);
        for o in o0..o0 + nrows {
            // Padded rows top..top+eff_kh into the ring; each replaces a row above top.
            let top = o * d.sh;
            next = next.max(top);
            while next < top + eff_kh {
                let row = &mut ring[next % eff_kh * slot_len..][ca * CB..cb * CB];
                match next.checked_sub(d.pt).filter(|&sr| sr < d.ih) {
                    Some(sr) => interleave(isa, &b.x[sr * d.iw..], insz, h, row),
                    None => row.fill(0.0),
                }
                next += 1;
            }
            for (i, off) in offs.iter_mut().enumerate() {
                *off = (top + i * d.dh) % eff_kh * slot_len;
            }
            for k in 0..mult {
                let out = &mut res[k * flush_len + (o - o0) * d.ow * CB..][..d.ow * CB];
                let bias: &[f32; CB] = bt[k * CB..][..CB].try_into().expect("CB lanes");
                out_row::<FMA, PB>(d, ring, &offs, &wt[k * ksz * CB..][..ksz * CB], bias, out);
            }
        }
        // Back to the planes, then the activation while they are in L1.
        let (p0, np) = ((o0 - r0) * d.ow, nrows * d.ow);
        for k in 0..mult {
            let mut dst: [&mut [f32]; CB] = Default::default();
            for (dp, plane) in dst.iter_mut().zip(planes.iter_mut().skip(k).step_by(mult)) {
                *dp = &mut plane[p0..p0 + np];
            }
            deinterleave(isa, &res[k * flush_len..][..np * CB], &mut dst[..h]);
            for plane in &mut dst[..h] {
                apply_act(plane, b.act);
            }
        }
        o0 += nrows;
    }
}

/// `dst[p·CB + l] = src[l·ld + p]` for the `n = dst.len() / CB` pixels `p` and lanes `l < h`
/// (lanes from h on are zero): `h` rows `ld` apart to channel-last.
fn interleave(isa: Isa, src: &[f32], ld: usize, h: usize, dst: &mut [f32]) {
    let n = dst.len() / CB;
    if n == 0 || h == 0 {
        dst.fill(0.0);
        return;
    }
    assert!(h <= CB && dst.len() == n * CB && (h - 1) * ld + n <= src.len());
    match isa {
        // SAFETY: `isa` is supported; bounds asserted above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { interleave_avx512(src, ld, h, dst) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { interleave_avx2(src, ld, h, dst) },
        _ => {
            for (p, px) in dst.chunks_exact_mut(CB).enumerate() {
                for (l, v) in px.iter_mut().enumerate() {
                    *v = if l < h { src[l * ld + p] } else { 0.0 };
                }
            }
        }
    }
}

/// `dst[l][p] = src[p·CB + l]` for the `n = src.len() / CB` pixels `p` and the `h = dst.len()`
/// lanes `l`: channel-last back to rows.
fn deinterleave(isa: Isa, src: &[f32], dst: &mut [&mut [f32]]) {
    let (n, h) = (src.len() / CB, dst.len());
    assert!(h <= CB && src.len() == n * CB && dst.iter().all(|r| r.len() == n));
    match isa {
        // SAFETY: `isa` is supported; bounds asserted above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { deinterleave_avx512(src, dst) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { deinterleave_avx2(src, dst) },
        _ => {
            for (l, row) in dst.iter_mut().enumerate() {
                for (p, v) in row.iter_mut().enumerate() {
                    *v = src[p * CB + l];
                }
            }
        }
    }
}

/// `interleave` by 16×16 register transposes, masked loads for the last pixels.
///
/// # Safety
/// AVX-512F is available; `h ≤ 16`, `dst.len() = n·16`, `(h-1)·ld + n ≤ src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave_avx512(src: &[f32], ld: usize, h: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = dst.len() / CB;
    let (s, o) = (src.as_ptr(), dst.as_mut_ptr());
    let mut q = 0;
    while q < n {
        let m = (n - q).min(CB);
        let mask = ((1u32 << m) - 1) as __mmask16;
        // (No masked loads of rows from h on: a fully masked load of an address past the data
        // still costs a slow microcode assist on some CPUs.)
        let r: [__m512; CB] =
            std::array::from_fn(|l| if l < h { _mm512_maskz_loadu_ps(mask, s.add(l * ld + q)) } else { _mm512_setzero_ps() });
        let t = transpose16x16(r);
        for (p, v) in t.iter().enumerate().take(m) {
            _mm512_storeu_ps(o.add((q + p) * CB), *v);
        }
        q += CB;
    }
}

/// `deinterleave` by 16×16 register transposes, masked stores for the last pixels.
///
/// # Safety
/// AVX-512F is available; `dst.len() ≤ 16`, `src.len() = n·16` and every `dst` row `n` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn deinterleave_avx512(src: &[f32], dst: &mut [&mut [f32]]) {
    use std::arch::x86_64::*;
    let n = src.len() / CB;
    let s = src.as_ptr();
    let mut q = 0;
    while q < n {
        let m = (n - q).min(CB);
        let mask = ((1u32 << m) - 1) as __mmask16;
        let r: [__m512; CB] = std::array::from_fn(|p| if p < m { _mm512_loadu_ps(s.add((q + p) * CB)) } else { _mm512_setzero_ps() });
        let t = transpose16x16(r);
        for (row, v) in dst.iter_mut().zip(&t) {
            _mm512_mask_storeu_ps(row.as_mut_ptr().add(q), mask, *v);
        }
        q += CB;
    }
}

/// Lanes `0..m` of an AVX2 mask (`m ≤ 8`).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn mask8(m: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_cmpgt_epi32(_mm256_set1_epi32(m as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// `interleave` by 8×8 register transposes (two per 8 pixels), masked loads for the last pixels.
///
/// # Safety
/// AVX2 is available; `h ≤ 16`, `dst.len() = n·16`, `(h-1)·ld + n ≤ src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interleave_avx2(src: &[f32], ld: usize, h: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = dst.len() / CB;
    let (s, o) = (src.as_ptr(), dst.as_mut_ptr());
    let mut q = 0;
    while q < n {
        let m = (n - q).min(8);
        let mask = mask8(m);
        for half in 0..2 {
            let r: [__m256; 8] = std::array::from_fn(|i| {
                let l = half * 8 + i;
                match (l < h, m == 8) {
                    (false, _) => _mm256_setzero_ps(),
                    (true, true) => _mm256_loadu_ps(s.add(l * ld + q)),
                    (true, false) => _mm256_maskload_ps(s.add(l * ld + q), mask),
                }
            });
            let t = transpose8(r);
            for (p, v) in t.iter().enumerate().take(m) {
                _mm256_storeu_ps(o.add((q + p) * CB + half * 8), *v);
            }
        }
        q += 8;
    }
}

/// `deinterleave` by 8×8 register transposes (two per 8 pixels), masked stores for the last
/// pixels.
///
/// # Safety
/// AVX2 is available; `dst.len() ≤ 16`, `src.len() = n·16` and every `dst` row `n` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn deinterleave_avx2(src: &[f32], dst: &mut [&mut [f32]]) {
    use std::arch::x86_64::*;
    let n = src.len() / CB;
    let s = src.as_ptr();
    let mut q = 0;
    while q < n {
        let m = (n - q).min(8);
        let mask = mask8(m);
        for (half, rows) in dst.chunks_mut(8).enumerate() {
            let r: [__m256; 8] =
                std::array::from_fn(|p| if p < m { _mm256_loadu_ps(s.add((q + p) * CB + half * 8)) } else { _mm256_setzero_ps() });
            let t = transpose8(r);
            for (row, v) in rows.iter_mut().zip(&t) {
                if m == 8 {
                    _mm256_storeu_ps(row.as_mut_ptr().add(q), *v);
                } else {
                    _mm256_maskstore_ps(row.as_mut_ptr().add(q), mask, *v);
                }
            }
        }
        q += 8;
    }
}

/// The transpose of 8 vectors of 8 floats, `out[j][i] = r[i][j]`: pairs of rows interleaved,
/// then quads of columns within 128-bit lanes, then the lanes swapped across row quads.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx")]
unsafe fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    // u[j]: column j (j < 4) of rows 0..4 (j ≥ 4: 4..8) in the low lane, column j + 4 in the high.
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ]
}

/// One output row of the block (`[ow][CB]`): `out_row_any` with the common kernel widths and
/// strides (unit column dilation) as constants, so the taps unroll.
#[inline(always)]
fn out_row<const FMA: bool, const PB: usize>(d: &Dw, ring: &[f32], offs: &[usize], wt: &[f32], bias: &[f32; CB], out: &mut [f32]) {
    match (d.kh, d.kw, d.sw, d.dw) {
        (3, 3, 1, 1) => out_row_any::<FMA, PB>(ring, offs, wt, bias, out, 3, 3, 1, 1),
        (3, 3, 2, 1) => out_row_any::<FMA, PB>(ring, offs, wt, bias, out, 3, 3, 2, 1),
        (5, 5, 1, 1) => out_row_any::<FMA, PB>(ring, offs, wt, bias, out, 5, 5, 1, 1),
        (5, 5, 2, 1) => out_row_any::<FMA, PB>(ring, offs, wt, bias, out, 5, 5, 2, 1),
        (kh, kw, sw, dw) => out_row_any::<FMA, PB>(ring, offs, wt, bias, out, kh, kw, sw, dw),
    }
}

/// The CB floats of `s` from `off`.
///
/// # Safety
/// `off + CB <= s.len()`.
#[inline(always)]
unsafe fn lanes(s: &[f32], off: usize) -> &[f32; CB] {
    &*(s.as_ptr().add(off) as *const [f32; CB])
}

/// One output row: pixel `c` (`out[c·CB..]`) accumulates tap (i, j) as `wt[(i·kw + j)·CB..]` times
/// `ring[offs[i] + (c·sw + j·dw)·CB..]`, in register blocks of the largest P in {PB, 4, 2, 1}
/// that fits the row; the last block is moved back to end at the row's end (pixels computed twice
/// get the same value), so there is no slower tail.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn out_row_any<const FMA: bool, const PB: usize>(
    ring: &[f32],
    offs: &[usize],
    wt: &[f32],
    bias: &[f32; CB],
    out: &mut [f32],
    kh: usize,
    kw: usize,
    sw: usize,
    dw: usize,
) {
    let ow = out.len() / CB;
    if ow == 0 {
        return;
    }
    assert_eq!(offs.len(), kh);
    let k = Taps { ring, offs, wt, bias, kw, sw, dw };
    if ow >= PB {
        pixel_blocks::<FMA, PB>(&k, out, ow);
    } else if ow >= 4 {
        pixel_blocks::<FMA, 4>(&k, out, ow);
    } else if ow >= 2 {
        pixel_blocks::<FMA, 2>(&k, out, ow);
    } else {
        pixel_blocks::<FMA, 1>(&k, out, ow);
    }
}

/// The operands of `out_row_any`: kernel row `i` reads `ring` from `offs[i]`.
struct Taps<'a> {
    ring: &'a [f32],
    offs: &'a [usize],
    wt: &'a [f32],
    bias: &'a [f32; CB],
    kw: usize,
    sw: usize,
    dw: usize,
}

/// `$body` for `$p` in `0..$n` (`$n ≤ 8` a constant), unrolled: LLVM does not fully unroll the
/// pixel loop at 8 pixels × 16 lanes, and the accumulators then go to memory.
macro_rules! unroll8 {
    ($p:ident, $n:expr, $body:block) => {
        unroll8!(@ $p, $n, $body, 0, 1, 2, 3, 4, 5, 6, 7)
    };
    (@ $p:ident, $n:expr, $body:block, $($i:literal),*) => {
        $(if $i < $n {
            let $p = $i;
            $body
        })*
    };
}

/// Output pixels `0..ow` (`ow ≥ P`) in blocks of P, the last one ending at `ow`.
#[inline(always)]
fn pixel_blocks<const FMA: bool, const P: usize>(k: &Taps, out: &mut [f32], ow: usize) {
    const { assert!(P <= 8) };
    // The last pixel's last tap reads CB floats from ((ow-1)·sw + (kw-1)·dw)·CB of each row.
    let need = ((ow - 1) * k.sw + (k.kw - 1) * k.dw + 1) * CB;
    assert!(ow >= P && out.len() >= ow * CB && k.wt.len() >= k.offs.len() * k.kw * CB);
    assert!(k.offs.iter().all(|&o| o + need <= k.ring.len()));
    let mut c = 0;
    while c < ow {
        let c0 = c.min(ow - P);
        let mut acc = [*k.bias; P];
        for (i, &off) in k.offs.iter().enumerate() {
            // SAFETY: off + need ≤ ring.len(); the pixels read are below ow, so every offset read
            // + CB ≤ need; (i·kw + j + 1)·CB ≤ wt.len() (all asserted above).
            let row = unsafe { k.ring.get_unchecked(off..off + need) };
            for j in 0..k.kw {
                let wv = unsafe { lanes(k.wt, (i * k.kw + j) * CB) };
                unroll8!(p, P, {
                    let v = unsafe { lanes(row, ((c0 + p) * k.sw + j * k.dw) * CB) };
                    for l in 0..CB {
                        acc[p][l] = madd::<FMA>(wv[l], v[l], acc[p][l]);
                    }
                });
            }
        }
        for (p, a) in acc.iter().enumerate() {
            out[(c0 + p) * CB..][..CB].copy_from_slice(a);
        }
        c = c0 + P;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ctx::OpCtx;
    use crate::cpu::gemm::act_scalar;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};
    use kiln_runtime::Tensor;
    use proptest::prelude::*;

    /// A depthwise problem: `c` input channels, multiplier `mult`, per spatial dim (1 or 2) the
    /// input, kernel, stride and dilation, pads as (begins…, ends…).
    #[derive(Clone, Debug)]
    struct Case {
        n: usize,
        c: usize,
        mult: usize,
        input: Vec<usize>,
        kernel: Vec<usize>,
        strides: Vec<usize>,
        dil: Vec<usize>,
        pads: Vec<usize>,
        bias: bool,
        act: Act,
    }

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    impl Case {
        fn out_dims(&self) -> Vec<usize> {
            let nd = self.input.len();
            (0..nd)
                .map(|i| {
                    let ek = (self.kernel[i] - 1) * self.dil[i] + 1;
                    let padded = self.input[i] + self.pads[i] + self.pads[i + nd];
                    if padded < ek { 0 } else { (padded - ek) / self.strides[i] + 1 }
                })
                .collect()
        }

        /// The definition, accumulated in f64, against the blocked kernel of every ISA here.
        fn check(&self, seed: u64) {
            let nd = self.input.len();
            let m = self.c * self.mult;
            let mut r = lcg(seed);
            let mut xs = vec![self.n, self.c];
            xs.extend(&self.input);
            let mut ws = vec![m, 1];
            ws.extend(&self.kernel);
            let x: Vec<f32> = (0..xs.iter().product::<usize>()).map(|_| r()).collect();
            let w: Vec<f32> = (0..ws.iter().product::<usize>()).map(|_| r()).collect();
            let b: Option<Vec<f32>> = self.bias.then(|| (0..m).map(|_| r()).collect());
            let ints = |name: &str, v: &[usize]| Attr {
                name: name.into(),
                kind: AttrKind::Ints as i32,
                ints: v.iter().map(|&v| v as i64).collect(),
                ..Default::default()
            };
            let attrs = vec![
                ints("strides", &self.strides),
                ints("dilations", &self.dil),
                ints("pads", &self.pads),
                Attr { name: "group".into(), kind: AttrKind::Int as i32, i: self.c as i64, ..Default::default() },
            ];
            let step = Step { op: "Conv".into(), opset: 17, attrs, ..Default::default() };
            let ctx = OpCtx::new(&step, None);
            let (xt, wt) = (Tensor::from_vec(&xs, x.clone()).unwrap(), Tensor::from_vec(&ws, w.clone()).unwrap());
            let s = super::super::conv::conv_shape(&ctx, &xt, &wt).unwrap();
            // 1-D as 2-D with a unit leading dim.
            let two = |v: &[usize], one: usize| if nd == 1 { vec![one, v[0]] } else { v.to_vec() };
            let (inp, k, st) = (two(&self.input, 1), two(&self.kernel, 1), two(&self.strides, 1));
            let (dl, out) = (two(&self.dil, 1), two(&self.out_dims(), 1));
            // Only the leading pads matter: the output dims already account for the trailing ones.
            let pb = two(&self.pads[..nd], 0);
            let (insz, outsz) = (inp[0] * inp[1], out[0] * out[1]);
            let mut want = vec![0f32; self.n * m * outsz];
            for bi in 0..self.n {
                for mo in 0..m {
                    let xc = &x[(bi * self.c + mo / self.mult) * insz..][..insz];
                    for (o, v) in want[(bi * m + mo) * outsz..][..outsz].iter_mut().enumerate() {
                        let (oy, ox) = (o / out[1], o % out[1]);
                        let mut acc = b.as_ref().map_or(0.0, |b| b[mo] as f64);
                        for i in 0..k[0] {
                            for j in 0..k[1] {
                                let iy = (oy * st[0] + i * dl[0]) as isize - pb[0] as isize;
                                let ix = (ox * st[1] + j * dl[1]) as isize - pb[1] as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < inp[0] && (ix as usize) < inp[1] {
                                    acc += xc[iy as usize * inp[1] + ix as usize] as f64 * w[(mo * k[0] + i) * k[1] + j] as f64;
                                }
                            }
                        }
                        *v = act_scalar(acc as f32, self.act);
                    }
                }
            }
            for isa in crate::cpu::isa::available() {
                let mut y = vec![f32::NAN; want.len()];
                depthwise_blocked_f32(isa, &s, &x, &w, b.as_deref(), self.act, &mut y);
                for (i, (&g, &r)) in y.iter().zip(&want).enumerate() {
                    assert!((g - r).abs() <= 1e-5 + 1e-4 * r.abs(), "{isa} {self:?}: element {i}: got {g}, want {r}");
                }
            }
        }
    }

    /// A 2-D case: (batch, channels, multiplier), input, kernel, strides, dilations, pads.
    fn case2d((n, c, mult): (usize, usize, usize), hw: [usize; 2], k: [usize; 2], s: [usize; 2], d: [usize; 2], pads: [usize; 4]) -> Case {
        let v = |a: &[usize]| a.to_vec();
        Case { n, c, mult, input: v(&hw), kernel: v(&k), strides: v(&s), dil: v(&d), pads: v(&pads), bias: true, act: Act::HardSwish }
    }

    #[test]
    fn blocked_depthwise_shapes() {
        // Channel tails, multiplier 2, batch 2, tiny planes, 1×k, dilation, uneven and large
        // padding, several flushes per block, long rows.
        let cases = [
            case2d((2, 17, 2), [9, 11], [3, 3], [1, 1], [1, 1], [1, 0, 2, 1]),
            case2d((1, 33, 1), [1, 1], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            case2d((2, 5, 1), [3, 5], [5, 5], [2, 2], [1, 1], [2, 2, 2, 2]),
            case2d((1, 20, 1), [3, 5], [3, 3], [1, 2], [1, 1], [0, 1, 2, 0]),
            case2d((1, 16, 2), [6, 20], [1, 7], [1, 1], [1, 1], [0, 3, 0, 3]),
            case2d((1, 9, 1), [10, 12], [3, 3], [1, 1], [2, 2], [2, 2, 2, 2]),
            case2d((1, 18, 1), [12, 13], [5, 5], [2, 1], [2, 1], [3, 0, 1, 4]),
            case2d((1, 40, 1), [30, 30], [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]),
            case2d((1, 3, 1), [4, 300], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            case2d((1, 16, 1), [7, 7], [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]),
            case2d((1, 31, 1), [14, 14], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            case2d((1, 4, 1), [5, 5], [1, 1], [3, 3], [1, 1], [2, 2, 2, 2]),
            // Parallel (work ≥ PAR_MIN_WORK): few blocks split into row bands, and many blocks.
            case2d((1, 16, 1), [64, 70], [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]),
            case2d((2, 48, 2), [20, 21], [5, 5], [1, 2], [1, 1], [2, 2, 2, 2]),
        ];
        for (i, c) in cases.iter().enumerate() {
            c.check(i as u64);
        }
        // 1-D, without bias.
        let v = |a: &[usize]| a.to_vec();
        let (input, kernel, strides, dil, pads) = (v(&[30]), v(&[5]), v(&[2]), v(&[1]), v(&[2, 1]));
        let c1 = Case { n: 2, c: 21, mult: 2, input, kernel, strides, dil, pads, bias: false, act: Act::Relu };
        c1.check(99);
    }

    const ACTS: [Act; 4] = [Act::None, Act::Relu, Act::HardSwish, Act::Sigmoid];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Random shapes: 1–40 channels (tails of a 16-channel block), multiplier 1–2, batch
        /// 1–2, 1-D or 2-D, kernels 1–5, strides and dilations 1–2, uneven padding.
        #[test]
        fn blocked_depthwise_random(
            n in 1usize..=2, c in 1usize..=40, mult in 1usize..=2, bias: bool, act in 0usize..ACTS.len(), seed in any::<u64>(),
            dims in prop::collection::vec((1usize..=14, 1usize..=5, 1usize..=2, 1usize..=2, 0usize..=2, 0usize..=2), 1..=2),
        ) {
            let mut pads: Vec<usize> = dims.iter().map(|d| d.4).collect();
            pads.extend(dims.iter().map(|d| d.5));
            let case = Case {
                n,
                c,
                mult,
                input: dims.iter().map(|d| d.0).collect(),
                kernel: dims.iter().map(|d| d.1).collect(),
                strides: dims.iter().map(|d| d.2).collect(),
                dil: dims.iter().map(|d| d.3).collect(),
                pads,
                bias,
                act: ACTS[act],
            };
            prop_assume!(case.out_dims().iter().all(|&o| o > 0));
            case.check(seed);
        }
    }
}
