//! Portable microkernel: a 4×8 tile in a local array (the compiler may vectorize it with the
//! baseline SIMD of the target). Partial tiles compute the full width into the array and write back
//! only the real columns.

// Register tiles are indexed by row and vector on purpose: the indices are the tile layout.
#![allow(clippy::needless_range_loop)]

use super::{BRows, Gathered, Strided};

/// Rows of the tile.
pub(crate) const MR: usize = 4;
/// Columns of the tile.
pub(crate) const NR: usize = 8;

/// Same contract as the SIMD kernels (see `super::KernelFn`).
///
/// # Safety
/// Pointers cover the described ranges; 1 ≤ mr ≤ MR, 1 ≤ nr ≤ NR.
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

/// [`kernel`] with B's row p at `b + offs[p]`.
///
/// # Safety
/// As for [`kernel`], with `offs` holding `kc` offsets, each leaving NR readable floats.
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

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles<R: BRows>(mr: usize, nr: usize, kc: usize, a: *const f32, b: *const f32, rows: R, c: *mut f32, ldc: usize, alpha: f32, load: bool) {
    match mr {
        1 => tile::<1, R>(nr, kc, a, b, rows, c, ldc, alpha, load),
        2 => tile::<2, R>(nr, kc, a, b, rows, c, ldc, alpha, load),
        3 => tile::<3, R>(nr, kc, a, b, rows, c, ldc, alpha, load),
        _ => tile::<4, R>(nr, kc, a, b, rows, c, ldc, alpha, load),
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const M: usize, R: BRows>(
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
    let mut acc = [[0f32; NR]; M];
    for p in 0..kc {
        let bp = std::slice::from_raw_parts(rows.at(b, p), NR);
        let ap = std::slice::from_raw_parts(a.add(p * MR), M);
        for (row, &av) in acc.iter_mut().zip(ap) {
            for (x, &bv) in row.iter_mut().zip(bp) {
                *x += av * bv;
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let cr = std::slice::from_raw_parts_mut(c.add(i * ldc), nr);
        for (o, &x) in cr.iter_mut().zip(row) {
            let v = x * alpha;
            *o = if load { *o + v } else { v };
        }
    }
}
