//! Portable int8 microkernel (also the reference the SIMD kernels are tested against).

use super::{GROUP, PANEL, TILE_M, TILE_N};

/// See `QKernel::run`.
///
/// # Safety
/// As `QKernel::run`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn kernel(mr: usize, np: usize, kg: usize, a: *const u8, lda: usize, b: *const u8, b_step: usize, acc: &mut [i32; TILE_M * TILE_N]) {
    for i in 0..mr {
        let arow = std::slice::from_raw_parts(a.add(i * lda), kg * 4);
        for p in 0..np {
            let panel = std::slice::from_raw_parts(b.add(p * b_step), kg * GROUP);
            let mut sums = [0i32; PANEL];
            for (g, grp) in panel.chunks_exact(GROUP).enumerate() {
                let av = &arow[g * 4..g * 4 + 4];
                for (s, wb) in sums.iter_mut().zip(grp.chunks_exact(4)) {
                    *s += av.iter().zip(wb).map(|(&x, &w)| x as i32 * (w as i8) as i32).sum::<i32>();
                }
            }
            acc[i * TILE_N + p * PANEL..i * TILE_N + (p + 1) * PANEL].copy_from_slice(&sums);
        }
    }
}
