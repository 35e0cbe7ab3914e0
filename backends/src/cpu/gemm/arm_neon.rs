//! NEON microkernel (aarch64): an 8×12 tile of C in 24 q-register accumulators, B as three 4-float
//! vectors per k step, A broadcast with `ld1r`. Partial columns go through a small stack buffer.

// Register tiles are indexed by row and vector on purpose: the indices are the tile layout.
#![allow(clippy::needless_range_loop)]

use super::{BRows, Gathered, Strided};
use std::arch::aarch64::*;

/// Rows of the register tile.
pub(crate) const MR: usize = 8;
/// 4-float vectors per tile row.
const NV: usize = 3;
/// Columns of the register tile.
pub(crate) const NR: usize = 4 * NV;

/// Same contract as the x86 kernels (see `super::KernelFn`).
///
/// # Safety
/// Pointers cover the described ranges; 1 ≤ mr ≤ MR, 1 ≤ nr ≤ NR.
#[target_feature(enable = "neon")]
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
#[target_feature(enable = "neon")]
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
#[target_feature(enable = "neon")]
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
        3 => go!(3, 1),
        4 => go!(4, 1),
        5 => go!(5, 1),
        6 => go!(6, 1),
        7 => go!(7, 1),
        _ => go!(8, 1),
    }
}

#[target_feature(enable = "neon")]
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
    let mut acc = [[[vdupq_n_f32(0.0); NV]; M]; KU];
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
                acc[0][i][v] = vaddq_f32(acc[0][i][v], acc[u][i][v]);
            }
        }
    }
    let va = vdupq_n_f32(alpha);
    for (i, row) in acc[0].iter().enumerate() {
        let cr = c.add(i * ldc);
        if nr == NR {
            for v in 0..NV {
                let mut x = vmulq_f32(row[v], va);
                if load {
                    x = vaddq_f32(x, vld1q_f32(cr.add(4 * v)));
                }
                vst1q_f32(cr.add(4 * v), x);
            }
        } else {
            let mut tmp = [0f32; NR];
            for v in 0..NV {
                vst1q_f32(tmp.as_mut_ptr().add(4 * v), vmulq_f32(row[v], va));
            }
            for (j, &x) in tmp[..nr].iter().enumerate() {
                let o = cr.add(j);
                *o = if load { *o + x } else { x };
            }
        }
    }
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn step<const M: usize>(acc: &mut [[float32x4_t; NV]; M], a: *const f32, b: *const f32) {
    let mut bv = [vdupq_n_f32(0.0); NV];
    for (v, x) in bv.iter_mut().enumerate() {
        *x = vld1q_f32(b.add(4 * v));
    }
    for (i, row) in acc.iter_mut().enumerate() {
        let av = vld1q_dup_f32(a.add(i));
        for v in 0..NV {
            row[v] = vfmaq_f32(row[v], av, bv[v]);
        }
    }
}
