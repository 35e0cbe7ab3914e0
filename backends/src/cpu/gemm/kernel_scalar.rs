//! Portable microkernel: a 4×8 tile in a local array (the compiler may vectorize it with the
//! baseline SIMD of the target). Partial tiles compute the full width into the array and write back
//! only the real columns.

// Register tiles are indexed by row and vector on purpose: the indices are the tile layout.
#![allow(clippy::needless_range_loop)]

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
    match mr {
        1 => tile::<1>(nr, kc, a, b, ldb, c, ldc, alpha, load),
        2 => tile::<2>(nr, kc, a, b, ldb, c, ldc, alpha, load),
        3 => tile::<3>(nr, kc, a, b, ldb, c, ldc, alpha, load),
        _ => tile::<4>(nr, kc, a, b, ldb, c, ldc, alpha, load),
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const M: usize>(
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
    let mut acc = [[0f32; NR]; M];
    for p in 0..kc {
        let bp = std::slice::from_raw_parts(b.add(p * ldb), NR);
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
