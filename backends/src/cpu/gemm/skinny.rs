//! Skinny products (at most `MAX_M` rows of A): matrix-vector style, with no packing of A or B.
//!
//! With so few rows the register-tile kernels spend their time packing or streaming B for too
//! little arithmetic, so B is read once, in place, in the layout it already has:
//! - Bᵀ stored row-major (a weight `[N, K]` read transposed, as recurrent layers and Gemm with
//!   transB do): every C element is a contiguous dot product, several columns at a time, with the
//!   partial sums folded horizontally at the end;
//! - row-major B or prepacked panels: C rows accumulate `a[i,p]·B[p, j..]` row by row of B.
//!
//! Columns go in blocks of `JB` so the epilogue runs on each block while it is in L1.

// Register tiles are indexed by row and column on purpose: the indices are the tile layout.
#![allow(clippy::needless_range_loop)]

use super::{epilogue, Epilogue, Isa, MatRef};

/// The most rows of A this path takes.
pub(crate) const MAX_M: usize = 4;
/// Columns per epilogue block.
const JB: usize = 64;

/// How B is laid out for the skinny kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SkinnyB<'a> {
    /// Row-major: B[p, j] = data[p·ld + j].
    Rows { data: &'a [f32], ld: usize },
    /// Prepacked panels: `nr`-wide panels of `k·nr` floats, zero-padded past N.
    Panels { data: &'a [f32], nr: usize },
    /// Transposed: B[p, j] = data[j·ld + p] (each column contiguous).
    Cols { data: &'a [f32], ld: usize },
}

/// One skinny product over columns `j0..j1` of C: `C = alpha·A·B (+ C)`, then the epilogue.
///
/// # Safety
/// `isa` is supported; the operands were checked by `sgemm` (A m×k, B k×n, C m rows of n floats
/// `ldc` apart at `c`); j0 is a multiple of the panel width for `Panels`; no other thread writes
/// these columns of C.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn run(
    isa: Isa,
    m: usize,
    k: usize,
    a: MatRef,
    b: SkinnyB,
    c: *mut f32,
    ldc: usize,
    j0: usize,
    j1: usize,
    accumulate: bool,
    epi: &Epilogue,
) {
    debug_assert!((1..=MAX_M).contains(&m) && k > 0);
    // The dot form wants contiguous rows of A; a transposed A is copied (m·k floats).
    let a_rows;
    let (ap, lda, acs) = match b {
        SkinnyB::Cols { .. } if a.cs != 1 => {
            a_rows = (0..m).flat_map(|i| (0..k).map(move |p| (i, p))).map(|(i, p)| a.data[i * a.rs + p * a.cs]).collect::<Vec<f32>>();
            (a_rows.as_ptr(), k, 1)
        }
        _ => (a.data.as_ptr(), a.rs, a.cs),
    };
    // Blocks of whole panels for prepacked B.
    let jb = match b {
        SkinnyB::Panels { nr, .. } => (JB / nr).max(1) * nr,
        _ => JB,
    };
    let mut j = j0;
    while j < j1 {
        let w = jb.min(j1 - j);
        let cp = c.add(j);
        let blk = Blk { m, k, a: ap, lda, acs, c: cp, ldc, w, alpha: epi.alpha, load: accumulate };
        match b {
            SkinnyB::Cols { data, ld } => dot(isa, &blk, data.as_ptr().add(j * ld), ld),
            SkinnyB::Rows { data, ld } => axpy(isa, &blk, data.as_ptr().add(j), ld),
            SkinnyB::Panels { data, nr } => {
                let mut q = 0;
                while q < w {
                    let wq = nr.min(w - q);
                    let pb = data.as_ptr().add(((j + q) / nr) * k * nr);
                    let sub = Blk { c: cp.add(q), w: wq, ..blk };
                    axpy(isa, &sub, pb, nr);
                    q += nr;
                }
            }
        }
        epilogue::apply(isa, cp, ldc, m, w, j, epi);
        j += w;
    }
}

/// One block of C: `m` rows × `w` columns at `c`, A rows `lda` apart with elements `acs` apart.
#[derive(Clone, Copy)]
struct Blk {
    m: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    acs: usize,
    c: *mut f32,
    ldc: usize,
    w: usize,
    alpha: f32,
    load: bool,
}

impl Blk {
    /// Write `v` (the raw product) to C[i, j], scaled and accumulated.
    #[inline(always)]
    unsafe fn put(&self, i: usize, j: usize, v: f32) {
        let p = self.c.add(i * self.ldc + j);
        let v = v * self.alpha;
        *p = if self.load { *p + v } else { v };
    }
}

/// Dot form dispatch: B column j at `b + j·ldb`, contiguous over k.
unsafe fn dot(isa: Isa, blk: &Blk, b: *const f32, ldb: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::dot512(blk, b, ldb),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => x86::dot256(blk, b, ldb),
        _ => dot_scalar(blk, b, ldb),
    }
}

/// Axpy form dispatch: B row p at `b + p·ldb`, `w` columns of it read.
unsafe fn axpy(isa: Isa, blk: &Blk, b: *const f32, ldb: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::axpy512(blk, b, ldb),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => x86::axpy256(blk, b, ldb),
        _ => axpy_scalar(blk, b, ldb),
    }
}

/// Portable dot form: four columns at a time with eight partial sums each (vectorizable).
unsafe fn dot_scalar(blk: &Blk, b: *const f32, ldb: usize) {
    let k = blk.k;
    for i in 0..blk.m {
        let ar = std::slice::from_raw_parts(blk.a.add(i * blk.lda), k);
        for j in 0..blk.w {
            let br = std::slice::from_raw_parts(b.add(j * ldb), k);
            let mut part = [0f32; 8];
            let mut ac = ar.chunks_exact(8);
            let mut bc = br.chunks_exact(8);
            for (x, y) in (&mut ac).zip(&mut bc) {
                for l in 0..8 {
                    part[l] += x[l] * y[l];
                }
            }
            let mut s: f32 = part.iter().sum();
            for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
                s += x * y;
            }
            blk.put(i, j, s);
        }
    }
}

/// Portable axpy form: a row of C accumulates `a[i,p]·B[p, ..w]`.
unsafe fn axpy_scalar(blk: &Blk, b: *const f32, ldb: usize) {
    let mut acc = [0f32; JB];
    for i in 0..blk.m {
        let acc = &mut acc[..blk.w];
        acc.fill(0.0);
        for p in 0..blk.k {
            let av = *blk.a.add(i * blk.lda + p * blk.acs);
            let br = std::slice::from_raw_parts(b.add(p * ldb), blk.w);
            for (x, &y) in acc.iter_mut().zip(br) {
                *x += av * y;
            }
        }
        for (j, &v) in acc.iter().enumerate() {
            blk.put(i, j, v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Blk;

    /// Sums of four vectors (one per lane of the result).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum4_256(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
    }

    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    #[inline]
    unsafe fn fold512(x: __m512) -> __m256 {
        _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1))
    }

    /// `M` rows × `J` columns of dot products over all of k.
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    #[inline]
    unsafe fn dot_tile512<const M: usize, const J: usize>(blk: &Blk, b: *const f32, ldb: usize, j: usize) {
        let k = blk.k;
        let mut acc = [[_mm512_setzero_ps(); J]; M];
        let mut p = 0;
        while p + 16 <= k {
            let mut bv = [_mm512_setzero_ps(); J];
            for jj in 0..J {
                bv[jj] = _mm512_loadu_ps(b.add((j + jj) * ldb + p));
            }
            for i in 0..M {
                let av = _mm512_loadu_ps(blk.a.add(i * blk.lda + p));
                for jj in 0..J {
                    acc[i][jj] = _mm512_fmadd_ps(av, bv[jj], acc[i][jj]);
                }
            }
            p += 16;
        }
        if p < k {
            let mask = ((1u32 << (k - p)) - 1) as u16;
            let mut bv = [_mm512_setzero_ps(); J];
            for jj in 0..J {
                bv[jj] = _mm512_maskz_loadu_ps(mask, b.add((j + jj) * ldb + p));
            }
            for i in 0..M {
                let av = _mm512_maskz_loadu_ps(mask, blk.a.add(i * blk.lda + p));
                for jj in 0..J {
                    acc[i][jj] = _mm512_fmadd_ps(av, bv[jj], acc[i][jj]);
                }
            }
        }
        for i in 0..M {
            if J == 4 || J == 8 {
                for q in (0..J).step_by(4) {
                    let s = hsum4_256(
                        fold512(acc[i][q]),
                        fold512(acc[i][q + 1]),
                        fold512(acc[i][q + 2]),
                        fold512(acc[i][q + 3]),
                    );
                    let mut out = [0f32; 4];
                    _mm_storeu_ps(out.as_mut_ptr(), s);
                    for (jj, &v) in out.iter().enumerate() {
                        blk.put(i, j + q + jj, v);
                    }
                }
            } else {
                for jj in 0..J {
                    blk.put(i, j + jj, _mm512_reduce_add_ps(acc[i][jj]));
                }
            }
        }
    }

    /// Dot form with 512-bit vectors: eight columns at a time for one or two rows (enough
    /// independent sums to hide FMA latency), four for three or four rows.
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    pub(super) unsafe fn dot512(blk: &Blk, b: *const f32, ldb: usize) {
        macro_rules! cols {
            ($m:literal, $jw:literal) => {{
                let mut j = 0;
                while j + $jw <= blk.w {
                    dot_tile512::<$m, $jw>(blk, b, ldb, j);
                    j += $jw;
                }
                while j + 4 <= blk.w {
                    dot_tile512::<$m, 4>(blk, b, ldb, j);
                    j += 4;
                }
                while j < blk.w {
                    dot_tile512::<$m, 1>(blk, b, ldb, j);
                    j += 1;
                }
            }};
        }
        match blk.m {
            1 => cols!(1, 8),
            2 => cols!(2, 8),
            3 => cols!(3, 4),
            _ => cols!(4, 4),
        }
    }

    /// `M` rows × `J` columns of dot products with 256-bit vectors.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot_tile256<const M: usize, const J: usize>(blk: &Blk, b: *const f32, ldb: usize, j: usize) {
        let k = blk.k;
        let mut acc = [[_mm256_setzero_ps(); J]; M];
        let mut p = 0;
        while p + 8 <= k {
            let mut bv = [_mm256_setzero_ps(); J];
            for jj in 0..J {
                bv[jj] = _mm256_loadu_ps(b.add((j + jj) * ldb + p));
            }
            for i in 0..M {
                let av = _mm256_loadu_ps(blk.a.add(i * blk.lda + p));
                for jj in 0..J {
                    acc[i][jj] = _mm256_fmadd_ps(av, bv[jj], acc[i][jj]);
                }
            }
            p += 8;
        }
        if p < k {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((k - p) as i32), lanes);
            let mut bv = [_mm256_setzero_ps(); J];
            for jj in 0..J {
                bv[jj] = _mm256_maskload_ps(b.add((j + jj) * ldb + p), mask);
            }
            for i in 0..M {
                let av = _mm256_maskload_ps(blk.a.add(i * blk.lda + p), mask);
                for jj in 0..J {
                    acc[i][jj] = _mm256_fmadd_ps(av, bv[jj], acc[i][jj]);
                }
            }
        }
        for i in 0..M {
            if J == 4 || J == 8 {
                for q in (0..J).step_by(4) {
                    let s = hsum4_256(acc[i][q], acc[i][q + 1], acc[i][q + 2], acc[i][q + 3]);
                    let mut out = [0f32; 4];
                    _mm_storeu_ps(out.as_mut_ptr(), s);
                    for (jj, &v) in out.iter().enumerate() {
                        blk.put(i, j + q + jj, v);
                    }
                }
            } else {
                for jj in 0..J {
                    let s = hsum4_256(acc[i][jj], _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
                    blk.put(i, j + jj, _mm_cvtss_f32(s));
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot256(blk: &Blk, b: *const f32, ldb: usize) {
        macro_rules! cols {
            ($m:literal, $jw:literal) => {{
                let mut j = 0;
                while j + $jw <= blk.w {
                    dot_tile256::<$m, $jw>(blk, b, ldb, j);
                    j += $jw;
                }
                while j + 4 <= blk.w {
                    dot_tile256::<$m, 4>(blk, b, ldb, j);
                    j += 4;
                }
                while j < blk.w {
                    dot_tile256::<$m, 1>(blk, b, ldb, j);
                    j += 1;
                }
            }};
        }
        match blk.m {
            1 => cols!(1, 8),
            2 => cols!(2, 8),
            3 => cols!(3, 4),
            _ => cols!(4, 4),
        }
    }

    /// Axpy form with 512-bit vectors: `M` rows of up to 16·NV columns, `KU` sets of accumulators
    /// over alternate k steps (a lone row has too few sums to hide FMA latency).
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    #[inline]
    unsafe fn axpy_tile512<const M: usize, const NV: usize, const KU: usize>(
        blk: &Blk,
        b: *const f32,
        ldb: usize,
        j: usize,
        w: usize,
    ) {
        let mut masks = [0u16; NV];
        for (v, mk) in masks.iter_mut().enumerate() {
            let left = w.saturating_sub(16 * v).min(16);
            *mk = ((1u32 << left) - 1) as u16;
        }
        let mut acc = [[[_mm512_setzero_ps(); NV]; M]; KU];
        let b = b.add(j);
        // A macro, not a closure: closures do not inherit the function's target features.
        macro_rules! step {
            ($acc:expr, $p:expr) => {{
                let (acc, p) = (&mut $acc, $p);
                let mut bv = [_mm512_setzero_ps(); NV];
                for v in 0..NV {
                    bv[v] = _mm512_maskz_loadu_ps(masks[v], b.add(p * ldb + 16 * v));
                }
                for i in 0..M {
                    let av = _mm512_set1_ps(*blk.a.add(i * blk.lda + p * blk.acs));
                    for v in 0..NV {
                        acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
                    }
                }
            }};
        }
        let mut p = 0;
        while p + KU <= blk.k {
            for u in 0..KU {
                step!(acc[u], p + u);
            }
            p += KU;
        }
        while p < blk.k {
            step!(acc[0], p);
            p += 1;
        }
        for u in 1..KU {
            for i in 0..M {
                for v in 0..NV {
                    acc[0][i][v] = _mm512_add_ps(acc[0][i][v], acc[u][i][v]);
                }
            }
        }
        let va = _mm512_set1_ps(blk.alpha);
        for i in 0..M {
            let cr = blk.c.add(i * blk.ldc + j);
            for v in 0..NV {
                if masks[v] == 0 {
                    continue;
                }
                let mut x = _mm512_mul_ps(acc[0][i][v], va);
                if blk.load {
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(masks[v], cr.add(16 * v)));
                }
                _mm512_mask_storeu_ps(cr.add(16 * v), masks[v], x);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    pub(super) unsafe fn axpy512(blk: &Blk, b: *const f32, ldb: usize) {
        macro_rules! go {
            ($m:literal, $ku:literal) => {{
                let mut j = 0;
                while j < blk.w {
                    let w = 64.min(blk.w - j);
                    if w > 32 {
                        axpy_tile512::<$m, 4, $ku>(blk, b, ldb, j, w);
                    } else {
                        axpy_tile512::<$m, 2, { 2 * $ku }>(blk, b, ldb, j, w);
                    }
                    j += w;
                }
            }};
        }
        match blk.m {
            1 => go!(1, 2),
            2 => go!(2, 1),
            3 => go!(3, 1),
            _ => go!(4, 1),
        }
    }

    /// Axpy form with 256-bit vectors (see `axpy_tile512`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn axpy_tile256<const M: usize, const NV: usize, const KU: usize>(
        blk: &Blk,
        b: *const f32,
        ldb: usize,
        j: usize,
        w: usize,
    ) {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let full = w == 8 * NV;
        let mut masks = [_mm256_setzero_si256(); NV];
        for (v, mk) in masks.iter_mut().enumerate() {
            let left = w.saturating_sub(8 * v).min(8);
            *mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(left as i32), lanes);
        }
        let mut acc = [[[_mm256_setzero_ps(); NV]; M]; KU];
        let b = b.add(j);
        macro_rules! step {
            ($acc:expr, $p:expr) => {{
                let (acc, p) = (&mut $acc, $p);
                let mut bv = [_mm256_setzero_ps(); NV];
                for v in 0..NV {
                    let ptr = b.add(p * ldb + 8 * v);
                    bv[v] = if full { _mm256_loadu_ps(ptr) } else { _mm256_maskload_ps(ptr, masks[v]) };
                }
                for i in 0..M {
                    let av = _mm256_broadcast_ss(&*blk.a.add(i * blk.lda + p * blk.acs));
                    for v in 0..NV {
                        acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
                    }
                }
            }};
        }
        let mut p = 0;
        while p + KU <= blk.k {
            for u in 0..KU {
                step!(acc[u], p + u);
            }
            p += KU;
        }
        while p < blk.k {
            step!(acc[0], p);
            p += 1;
        }
        for u in 1..KU {
            for i in 0..M {
                for v in 0..NV {
                    acc[0][i][v] = _mm256_add_ps(acc[0][i][v], acc[u][i][v]);
                }
            }
        }
        let va = _mm256_set1_ps(blk.alpha);
        for i in 0..M {
            let cr = blk.c.add(i * blk.ldc + j);
            for v in 0..NV {
                let left = w.saturating_sub(8 * v).min(8);
                if left == 0 {
                    continue;
                }
                let ptr = cr.add(8 * v);
                let mut x = _mm256_mul_ps(acc[0][i][v], va);
                if left == 8 {
                    if blk.load {
                        x = _mm256_add_ps(x, _mm256_loadu_ps(ptr));
                    }
                    _mm256_storeu_ps(ptr, x);
                } else {
                    if blk.load {
                        x = _mm256_add_ps(x, _mm256_maskload_ps(ptr, masks[v]));
                    }
                    _mm256_maskstore_ps(ptr, masks[v], x);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy256(blk: &Blk, b: *const f32, ldb: usize) {
        macro_rules! go {
            ($m:literal, $ku:literal) => {{
                let mut j = 0;
                while j < blk.w {
                    let w = 32.min(blk.w - j);
                    if w > 16 {
                        axpy_tile256::<$m, 4, $ku>(blk, b, ldb, j, w);
                    } else {
                        axpy_tile256::<$m, 2, { 2 * $ku }>(blk, b, ldb, j, w);
                    }
                    j += w;
                }
            }};
        }
        match blk.m {
            1 => go!(1, 2),
            2 => go!(2, 1),
            3 => go!(3, 1),
            _ => go!(4, 1),
        }
    }
}
