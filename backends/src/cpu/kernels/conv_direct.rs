//! Direct f32 convolution: the GEMM microkernels read B's rows in place from a small input patch
//! through an offset table, so no im2col matrix is built and no B panel is packed.
//!
//! Per task (image, group, some output rows), for each output row and each tile of `nr` output
//! columns, the input window that tile needs is copied once into a patch with its padding as
//! zeros: for unit column stride one run of `nr + (kw-1)·dilation` floats per (channel, kernel
//! row), every tap of that run a shifted view of it; otherwise one `nr` run per (channel, tap).
//! The microkernel then computes all output channels of the group for the tile from the packed
//! weights (bias pre-filled, activation applied while the tile is in L1). Compared with im2col +
//! GEMM this moves the input once per tile instead of twice through memory, which is what limits
//! convolutions with few output channels (PP-OCR's 96→24 3×3 layers: 24 FMAs per moved float).

use kiln_runtime::Result;

use super::conv::{with_scratch, ConvShape, OutPtr};
use crate::cpu::gemm::pack::pack_a;
use crate::cpu::gemm::{apply_epilogue, kernel_for, Act, Epilogue, MatRef};
use crate::cpu::isa;

/// Whether the direct path suits this convolution: not 1×1 (that is a plain GEMM on the input)
/// and output rows wide enough to fill most of a register tile.
pub(super) fn suits(s: &ConvShape) -> bool {
    let g = &s.geo;
    !g.is_pointwise() && g.output[2] >= 8 && s.c / s.group > 0 && s.m / s.group > 0
}

/// `y = act(conv(x, w) + bias)`; buffers as for the im2col path (x NC…, w [M, C/group, k…]).
pub(super) fn conv_direct_f32(s: &ConvShape, x: &[f32], w: &[f32], bias: Option<&[f32]>, act: Act, y: &mut [f32]) -> Result<()> {
    let g = &s.geo;
    let kern = kernel_for(isa::active());
    let (mr, nr) = (kern.mr, kern.nr);
    let (cpg, mpg) = (s.c / s.group, s.m / s.group);
    let [kd, kh, kw] = g.kernel;
    let kdim = cpg * kd * kh * kw;
    let (insz, outsz) = (g.in_size(), g.out_size());
    let rows = g.output[0] * g.output[1];
    let ow = g.output[2];
    // Patch layout and the offset of every (channel, tap) row in it.
    let unit = g.stride[2] == 1;
    let run = if unit { nr + (kw - 1) * g.dilation[2] } else { nr };
    let runs = if unit { cpg * kd * kh } else { kdim };
    let patch_len = runs * run + nr; // + nr: the kernel reads nr floats from every row start
    let mut offs = Vec::with_capacity(kdim);
    for c in 0..cpg {
        for a in 0..kd {
            for b in 0..kh {
                for t in 0..kw {
                    let seg = ((c * kd + a) * kh + b) * if unit { 1 } else { kw } + if unit { 0 } else { t };
                    offs.push(seg * run + if unit { t * g.dilation[2] } else { 0 });
                }
            }
        }
    }
    // Weights packed mr-high per group (W_g is [mpg, kdim] row-major).
    let panels = mpg.div_ceil(mr);
    let mut apack = vec![0f32; s.group * panels * kdim * mr];
    for (grp, dst) in apack.chunks_exact_mut(panels * kdim * mr).enumerate() {
        let wg = &w[grp * mpg * kdim..][..mpg * kdim];
        pack_a(dst, MatRef::rows(wg, kdim), 0, mpg, 0, kdim, mr, kern.isa);
    }
    // Tasks: (image, group, block of output rows), about four per thread.
    let threads = crate::cpu::par::threads();
    let units = s.n * s.group;
    let per = if threads > 1 {
        rows.div_ceil((4 * threads).div_ceil(units)).max(1)
    } else {
        rows
    };
    let tasks: Vec<(usize, usize, usize)> = (0..units)
        .flat_map(|u| (0..rows).step_by(per).map(move |r| (u / s.group, u % s.group, r)))
        .collect();
    let out = OutPtr(y.as_mut_ptr());
    let ylen = y.len();
    let epi = Epilogue::new(None, act);
    crate::cpu::par::for_each(&tasks, |&(b, grp, r0)| {
        let out = out;
        let xg = &x[(b * s.c + grp * cpg) * insz..][..cpg * insz];
        let ag = &apack[grp * panels * kdim * mr..][..panels * kdim * mr];
        with_scratch(|buf, _| {
            let patch = buf.get(patch_len);
            patch[runs * run..].fill(0.0);
            for r in r0..(r0 + per).min(rows) {
                let (od, oh) = (r / g.output[1], r % g.output[1]);
                for j0 in (0..ow).step_by(nr) {
                    let cols = nr.min(ow - j0);
                    fill_patch(s, xg, cpg, [od, oh, j0], unit, run, &mut patch[..runs * run]);
                    for (pi, m0) in (0..mpg).step_by(mr).enumerate() {
                        let h = mr.min(mpg - m0);
                        let first = (b * s.m + grp * mpg + m0) * outsz + r * ow + j0;
                        assert!(first + (h - 1) * outsz + cols <= ylen);
                        // SAFETY: rows m0..m0+h of this image and group, output row r, columns
                        // j0..j0+cols lie in y (checked) and belong to this task alone.
                        unsafe {
                            let c = out.0.add(first);
                            if let Some(bias) = bias {
                                for i in 0..h {
                                    std::slice::from_raw_parts_mut(c.add(i * outsz), cols).fill(bias[grp * mpg + m0 + i]);
                                }
                            }
                            let a = ag[pi * kdim * mr..].as_ptr();
                            (kern.gather)(h, cols, kdim, a, patch.as_ptr(), offs.as_ptr(), c, outsz, 1.0, bias.is_some());
                            apply_epilogue(kern.isa, c, outsz, h, cols, 0, &epi);
                        }
                    }
                }
            }
        });
    });
    Ok(())
}

/// Copy the input window of output row (od, oh), columns j0.. into `patch` (zeros where the
/// window hangs over the padding or past the input).
fn fill_patch(s: &ConvShape, xg: &[f32], cpg: usize, [od, oh, j0]: [usize; 3], unit: bool, run: usize, patch: &mut [f32]) {
    let g = &s.geo;
    let [kd, kh, kw] = g.kernel;
    let [_, ih, iw] = g.input;
    let insz = g.in_size();
    // Input index along dim i for output o and tap t, if inside the input.
    let at = |i: usize, o: usize, t: usize| {
        (o * g.stride[i] + t * g.dilation[i])
            .checked_sub(g.pad[i])
            .filter(|&v| v < g.input[i])
    };
    let mut seg = patch.chunks_exact_mut(run);
    for c in 0..cpg {
        let xc = &xg[c * insz..][..insz];
        for a in 0..kd {
            let d = at(0, od, a);
            for b in 0..kh {
                let h = at(1, oh, b);
                let row = match (d, h) {
                    (Some(d), Some(h)) => Some(&xc[(d * ih + h) * iw..][..iw]),
                    _ => None,
                };
                let taps = if unit { 1 } else { kw };
                for t in 0..taps {
                    let dst = seg.next().expect("patch sized for every run");
                    let Some(row) = row else {
                        dst.fill(0.0);
                        continue;
                    };
                    if unit {
                        // Columns j0 - pad .. j0 - pad + run of the input row.
                        let start = j0 as isize - g.pad[2] as isize;
                        copy_clipped(row, start, dst);
                    } else {
                        let (sw, off) = (g.stride[2], (t * g.dilation[2]) as isize - g.pad[2] as isize);
                        for (j, v) in dst.iter_mut().enumerate() {
                            let src = ((j0 + j) * sw) as isize + off;
                            *v = if src >= 0 && (src as usize) < iw { row[src as usize] } else { 0.0 };
                        }
                    }
                }
            }
        }
    }
}

/// `dst[i] = row[start + i]`, zero outside the row.
#[inline]
fn copy_clipped(row: &[f32], start: isize, dst: &mut [f32]) {
    let n = dst.len() as isize;
    let lo = (-start).clamp(0, n) as usize;
    let hi = (row.len() as isize - start).clamp(0, n) as usize;
    dst[..lo].fill(0.0);
    if lo < hi {
        let s0 = (start + lo as isize) as usize;
        dst[lo..hi].copy_from_slice(&row[s0..s0 + hi - lo]);
    }
    dst[hi.max(lo)..].fill(0.0);
}
