//! AVX-512 microkernel: an MR×NR tile of C (NR = 16·NV) kept in zmm registers while K streams
//! through packed A (broadcasts) and B (vector loads). Partial columns use AVX-512 masks on the C
//! loads and stores; partial rows use a kernel instantiated for exactly that many rows, and rows
//! too few to hide FMA latency get extra accumulator sets over alternate k steps.

// Register tiles are indexed by row and vector on purpose: the indices are the tile layout.
#![allow(clippy::needless_range_loop)]

use super::{BRows, Gathered, Strided};
use std::arch::x86_64::*;

/// Rows of the register tile (the A panel height).
pub(crate) const MR: usize = 14;
/// 16-float vectors per tile row.
const NV: usize = 2;
/// Columns of the register tile (the B panel width).
pub(crate) const NR: usize = 16 * NV;

/// `C[..mr, ..nr] = alpha·Σ_p A[i,p]·B[p,j] (+ C if load)`; A packed with stride MR per k step, B rows
/// `ldb` floats apart holding at least NR readable floats each.
///
/// # Safety
/// AVX-512F is available; pointers cover the described ranges; 1 ≤ mr ≤ MR, 1 ≤ nr ≤ NR.
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
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
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
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
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
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
        6 => go!(6, 1),
        7 => go!(7, 1),
        8 => go!(8, 1),
        9 => go!(9, 1),
        10 => go!(10, 1),
        11 => go!(11, 1),
        12 => go!(12, 1),
        13 => go!(13, 1),
        _ => go!(14, 1),
    }
}

#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
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
    let mut acc = [[[_mm512_setzero_ps(); NV]; M]; KU];
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
                acc[0][i][v] = _mm512_add_ps(acc[0][i][v], acc[u][i][v]);
            }
        }
    }
    store::<M>(&acc[0], nr, c, ldc, alpha, load);
}

#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
#[inline]
unsafe fn step<const M: usize>(acc: &mut [[__m512; NV]; M], a: *const f32, b: *const f32) {
    let mut bv = [_mm512_setzero_ps(); NV];
    for (v, x) in bv.iter_mut().enumerate() {
        *x = _mm512_loadu_ps(b.add(16 * v));
    }
    for (i, row) in acc.iter_mut().enumerate() {
        let av = _mm512_set1_ps(*a.add(i));
        for v in 0..NV {
            row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
        }
    }
}

#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
#[inline]
unsafe fn store<const M: usize>(acc: &[[__m512; NV]; M], nr: usize, c: *mut f32, ldc: usize, alpha: f32, load: bool) {
    let mut masks = [0u16; NV];
    for (v, m) in masks.iter_mut().enumerate() {
        let left = nr.saturating_sub(16 * v).min(16);
        *m = ((1u32 << left) - 1) as u16;
    }
    let va = _mm512_set1_ps(alpha);
    let scale = alpha != 1.0;
    for (i, row) in acc.iter().enumerate() {
        let cr = c.add(i * ldc);
        for v in 0..NV {
            let mut x = row[v];
            if scale {
                x = _mm512_mul_ps(x, va);
            }
            let ptr = cr.add(16 * v);
            if masks[v] == 0xFFFF {
                if load {
                    x = _mm512_add_ps(x, _mm512_loadu_ps(ptr));
                }
                _mm512_storeu_ps(ptr, x);
            } else {
                if load {
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(masks[v], ptr));
                }
                _mm512_mask_storeu_ps(ptr, masks[v], x);
            }
        }
    }
}
