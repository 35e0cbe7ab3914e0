//! x86-64 int8 microkernels: an MR×(16·panels) tile of i32 sums kept in registers while the packed
//! weights stream through (one 64-byte load per panel and k group) and each A row's 4 bytes of the
//! group are broadcast. Partial row counts get a kernel instantiated for exactly that many rows.

// Register tiles are indexed by row and vector on purpose: the indices are the tile layout.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{TILE_M, TILE_N};

#[inline(always)]
unsafe fn bcast4(p: *const u8) -> i32 {
    (p as *const i32).read_unaligned()
}

/// AVX-512 VNNI: up to 8 rows × 2 panels (32 columns), `vpdpbusd` on zmm.
///
/// # Safety
/// As `QKernel::run`; AVX-512 F/BW/VL/VNNI available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn kernel_avx512vnni(mr: usize, np: usize, kg: usize, a: *const u8, lda: usize, b: *const u8, b_step: usize, acc: &mut [i32; TILE_M * TILE_N]) {
    macro_rules! go {
        ($($m:literal),*) => {
            match (mr, np) {
                $(($m, 1) => tile512::<$m, 1>(kg, a, lda, b, b_step, acc),)*
                $(($m, _) => tile512::<$m, 2>(kg, a, lda, b, b_step, acc),)*
                _ => tile512::<8, 2>(kg, a, lda, b, b_step, acc),
            }
        };
    }
    go!(1, 2, 3, 4, 5, 6, 7)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile512<const M: usize, const P: usize>(kg: usize, a: *const u8, lda: usize, b: *const u8, b_step: usize, acc: &mut [i32; TILE_M * TILE_N]) {
    let mut c = [[_mm512_setzero_si512(); P]; M];
    for g in 0..kg {
        let mut bv = [_mm512_setzero_si512(); P];
        for p in 0..P {
            bv[p] = _mm512_loadu_si512(b.add(p * b_step + g * 64) as *const _);
        }
        for i in 0..M {
            let av = _mm512_set1_epi32(bcast4(a.add(i * lda + g * 4)));
            for p in 0..P {
                c[i][p] = _mm512_dpbusd_epi32(c[i][p], av, bv[p]);
            }
        }
    }
    for i in 0..M {
        for p in 0..P {
            _mm512_storeu_si512(acc.as_mut_ptr().add(i * TILE_N + p * 16) as *mut _, c[i][p]);
        }
    }
}

/// AVX-VNNI: up to 4 rows × 1 panel (two ymm of 8 columns), `vpdpbusd` on ymm.
///
/// # Safety
/// As `QKernel::run`; AVX2 and AVX-VNNI available.
#[target_feature(enable = "avx2,avxvnni")]
pub(super) unsafe fn kernel_avxvnni(mr: usize, kg: usize, a: *const u8, lda: usize, b: *const u8, acc: &mut [i32; TILE_M * TILE_N]) {
    match mr {
        1 => tile_vnni256::<1>(kg, a, lda, b, acc),
        2 => tile_vnni256::<2>(kg, a, lda, b, acc),
        3 => tile_vnni256::<3>(kg, a, lda, b, acc),
        _ => tile_vnni256::<4>(kg, a, lda, b, acc),
    }
}

#[target_feature(enable = "avx2,avxvnni")]
unsafe fn tile_vnni256<const M: usize>(kg: usize, a: *const u8, lda: usize, b: *const u8, acc: &mut [i32; TILE_M * TILE_N]) {
    let mut c = [[_mm256_setzero_si256(); 2]; M];
    for g in 0..kg {
        let b0 = _mm256_loadu_si256(b.add(g * 64) as *const __m256i);
        let b1 = _mm256_loadu_si256(b.add(g * 64 + 32) as *const __m256i);
        for i in 0..M {
            let av = _mm256_set1_epi32(bcast4(a.add(i * lda + g * 4)));
            c[i][0] = _mm256_dpbusd_avx_epi32(c[i][0], av, b0);
            c[i][1] = _mm256_dpbusd_avx_epi32(c[i][1], av, b1);
        }
    }
    store256::<M>(&c, acc);
}

/// Plain AVX2: up to 4 rows × 1 panel. Each u8×i8 dot product of 4 is two exact `vpmaddwd` (even
/// bytes, odd bytes widened to i16), so large activations and weights never saturate.
///
/// # Safety
/// As `QKernel::run`; AVX2 available.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn kernel_avx2(mr: usize, kg: usize, a: *const u8, lda: usize, b: *const u8, acc: &mut [i32; TILE_M * TILE_N]) {
    match mr {
        1 => tile_avx2::<1>(kg, a, lda, b, acc),
        2 => tile_avx2::<2>(kg, a, lda, b, acc),
        3 => tile_avx2::<3>(kg, a, lda, b, acc),
        _ => tile_avx2::<4>(kg, a, lda, b, acc),
    }
}

#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<const M: usize>(kg: usize, a: *const u8, lda: usize, b: *const u8, acc: &mut [i32; TILE_M * TILE_N]) {
    let mut c = [[_mm256_setzero_si256(); 2]; M];
    let lo_byte = _mm256_set1_epi16(0x00FF);
    for g in 0..kg {
        let mut be = [_mm256_setzero_si256(); 2];
        let mut bo = [_mm256_setzero_si256(); 2];
        for h in 0..2 {
            let bv = _mm256_loadu_si256(b.add(g * 64 + h * 32) as *const __m256i);
            be[h] = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(bv));
            bo[h] = _mm256_srai_epi16::<8>(bv);
        }
        for i in 0..M {
            let av = _mm256_set1_epi32(bcast4(a.add(i * lda + g * 4)));
            let ae = _mm256_and_si256(av, lo_byte);
            let ao = _mm256_srli_epi16::<8>(av);
            for h in 0..2 {
                let s = _mm256_add_epi32(_mm256_madd_epi16(ae, be[h]), _mm256_madd_epi16(ao, bo[h]));
                c[i][h] = _mm256_add_epi32(c[i][h], s);
            }
        }
    }
    store256::<M>(&c, acc);
}

#[inline(always)]
unsafe fn store256<const M: usize>(c: &[[__m256i; 2]; M], acc: &mut [i32; TILE_M * TILE_N]) {
    for i in 0..M {
        for h in 0..2 {
            _mm256_storeu_si256(acc.as_mut_ptr().add(i * TILE_N + h * 8) as *mut __m256i, c[i][h]);
        }
    }
}

/// (min, max) of `src` with 0 included; NaNs are skipped (`vminps`/`vmaxps` return the second
/// operand, the running value, when the first is NaN).
///
/// # Safety
/// AVX-512F available.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn min_max0_avx512(src: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut chunks = src.chunks_exact(16);
    for c in &mut chunks {
        let v = _mm512_loadu_ps(c.as_ptr());
        lo = _mm512_min_ps(v, lo);
        hi = _mm512_max_ps(v, hi);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let m = (1u16 << rest.len()) - 1;
        let v = _mm512_maskz_loadu_ps(m, rest.as_ptr());
        lo = _mm512_min_ps(v, lo);
        hi = _mm512_max_ps(v, hi);
    }
    (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi))
}
