//! AVX2+FMA microkernel: a 6×16 tile of C in 12 ymm accumulators. Partial columns go through
//! `vmaskmovps` loads and stores; partial rows use a kernel instantiated for that many rows, with
//! extra accumulator sets over alternate k steps when the rows are too few to hide FMA latency.

// Register tiles are indexed by row and vector on purpose: the indices are the tile layout.
#![allow(clippy::needless_range_loop)]

use super::{BRows, Gathered, Strided};
use std::arch::x86_64::*;

/// Rows of the register tile.
pub(crate) const MR: usize = 6;
/// 8-float vectors per tile row.
const NV: usize = 2;
/// Columns of the register tile.
pub(crate) const NR: usize = 8 * NV;

/// Same contract as the AVX-512 kernel (see `super::KernelFn`).
///
/// # Safety
/// AVX2 and FMA are available; pointers cover the described ranges; 1 ≤ mr ≤ MR, 1 ≤ nr ≤ NR.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel(
    mr: usize,
    nr: usize,
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    load: bool,
) {
    tiles(mr, nr, kc, a, b, Strided(ldb), c, ldc, alpha, load)
}

/// [`kernel`] with B's row p at `b + offs[p]` (rows gathered in place: a direct convolution's
/// input taps).
///
/// # Safety
/// As for [`kernel`], with `offs` holding `kc` offsets, each leaving NR readable floats.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_gather(
    mr: usize,
    nr: usize,
    kc: usize,
    a: *const f32,
    b: *const f32,
    offs: *const usize,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    load: bool,
) {
    tiles(mr, nr, kc, a, b, Gathered(offs), c, ldc, alpha, load)
}

/// The tile kernel instantiated for `mr` rows (and its k unroll), for either way of reading B.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles<R: BRows>(mr: usize, nr: usize, kc: usize, a: *const f32, b: *const f32, rows: R, c: *mut f32, ldc: usize, alpha: f32, load: bool) {
    macro_rules! go {
        ($m:literal, $ku:literal) => {
            tile::<$m, $ku, R>(nr, kc, a, b, rows, c, ldc, alpha, load)
        };
    }
    match mr {
        1 => go!(1, 4),
        2 => go!(2, 2),
        3 => go!(3, 2),
        4 => go!(4, 1),
        5 => go!(5, 1),
        _ => go!(6, 1),
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const M: usize, const KU: usize, R: BRows>(
    nr: usize,
    kc: usize,
    a: *const f32,
    b: *const f32,
    rows: R,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    load: bool,
) {
    let mut acc = [[[_mm256_setzero_ps(); NV]; M]; KU];
    let mut a = a;
    let mut p = 0;
    while p + KU <= kc {
        for (u, accu) in acc.iter_mut().enumerate() {
            step::<M>(accu, a, rows.at(b, p + u));
            a = a.add(MR);
        }
        p += KU;
    }
    while p < kc {
        step::<M>(&mut acc[0], a, rows.at(b, p));
        a = a.add(MR);
        p += 1;
    }
    for u in 1..KU {
        for i in 0..M {
            for v in 0..NV {
                acc[0][i][v] = _mm256_add_ps(acc[0][i][v], acc[u][i][v]);
            }
        }
    }
    store::<M>(&acc[0], nr, c, ldc, alpha, load);
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn step<const M: usize>(acc: &mut [[__m256; NV]; M], a: *const f32, b: *const f32) {
    let mut bv = [_mm256_setzero_ps(); NV];
    for (v, x) in bv.iter_mut().enumerate() {
        *x = _mm256_loadu_ps(b.add(8 * v));
    }
    for (i, row) in acc.iter_mut().enumerate() {
        let av = _mm256_broadcast_ss(&*a.add(i));
        for v in 0..NV {
            row[v] = _mm256_fmadd_ps(av, bv[v], row[v]);
        }
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store<const M: usize>(acc: &[[__m256; NV]; M], nr: usize, c: *mut f32, ldc: usize, alpha: f32, load: bool) {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let va = _mm256_set1_ps(alpha);
    let scale = alpha != 1.0;
    for (i, row) in acc.iter().enumerate() {
        let cr = c.add(i * ldc);
        for v in 0..NV {
            let left = nr.saturating_sub(8 * v).min(8);
            if left == 0 {
                continue;
            }
            let mut x = row[v];
            if scale {
                x = _mm256_mul_ps(x, va);
            }
            let ptr = cr.add(8 * v);
            if left == 8 {
                if load {
                    x = _mm256_add_ps(x, _mm256_loadu_ps(ptr));
                }
                _mm256_storeu_ps(ptr, x);
            } else {
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left as i32), lanes);
                if load {
                    x = _mm256_add_ps(x, _mm256_maskload_ps(ptr, mask));
                }
                _mm256_maskstore_ps(ptr, mask, x);
            }
        }
    }
}
