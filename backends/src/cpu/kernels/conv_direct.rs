//! Direct f32 convolution: the GEMM microkernels read B's rows in place through an offset table,
//! so no im2col matrix is built and no B panel is packed.
//!
//! 1-D and 2-D convolutions first copy the input once with its zero padding, split by stride
//! phase (`pad_input`), into planes whose rows are a little wider than the output's. On that grid
//! every (channel, tap) row of a tile of `nr` output positions is a fixed offset from the tile's
//! first position, so the microkernel reads the copy directly. Tiles run on across output rows
//! when rows are short (a 20-wide row would otherwise waste 12 of a 32-wide tile); such tiles go
//! through a small buffer and their real columns are copied out. 3-D convolutions copy, per tile,
//! the input window into a patch instead.
//!
//! The microkernel computes all output channels of the group for a tile from the packed weights
//! (bias pre-filled, activation applied while the tile is in L1). Compared with im2col + GEMM this
//! moves the input through memory once instead of twice, which is what limits convolutions with
//! few output channels (PP-OCR's 96→24 3×3 layers: 24 FMAs per moved float).

use kiln_runtime::tensor::Buffer;
use kiln_runtime::Result;
use rayon::prelude::*;

use super::conv::{with_scratch, ConvShape, Geo3, OutPtr};
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
    // Patch layout (3-D convolutions).
    let unit = g.stride[2] == 1;
    let run = if unit { nr + (kw - 1) * g.dilation[2] } else { nr };
    let runs = if unit { cpg * kd * kh } else { kdim };
    let patch_len = runs * run + nr; // + nr: the kernel reads nr floats from every row start
    // Weights packed mr-high per group (W_g is [mpg, kdim] row-major).
    let panels = mpg.div_ceil(mr);
    let mut apack = vec![0f32; s.group * panels * kdim * mr];
    for (grp, dst) in apack.chunks_exact_mut(panels * kdim * mr).enumerate() {
        let wg = &w[grp * mpg * kdim..][..mpg * kdim];
        pack_a(dst, MatRef::rows(wg, kdim), 0, mpg, 0, kdim, mr, kern.isa);
    }
    // Output tiles of nr positions on a virtual grid of rows `wv` wide whose first `ow` columns
    // are the output row. Tiles either stay within a row (`wrap` false: a row of ow costs ⌈ow/nr⌉
    // tiles) or run on across rows (`wrap` true: a row costs wv/nr tiles); small rows (YOLO's
    // 20×20 and 40×40, PP-LCNet's 14×14) waste up to 70% of a tile per row otherwise.
    //
    // 1-D and 2-D tiles read straight from a zero-padded, stride-phase-split copy of the input
    // (`pad_input`, rows wv wide) in which every (channel, tap) row of a tile is a fixed offset
    // from its first position, so no per-tile patch is built (for small rows the patch copies
    // cost a third of the GEMM; with column stride 2 they went element by element). 3-D tiles
    // copy a patch per tile: with unit column stride every tap is a shifted view of one run, which
    // needs wv ≥ ow + (kw-1)·dilation; otherwise each tap has its own run.
    let row_cost = ow.div_ceil(nr) * nr;
    let two_d = kd == 1 && g.input[0] == 1;
    let wide = if two_d {
        ow + (kw - 1) * g.dilation[2] / g.stride[2]
    } else if unit {
        ow + (kw - 1) * g.dilation[2]
    } else {
        ow
    };
    let wrap = wide < row_cost;
    // Without wrap the patch grid is the output itself (row r, column j0 at r·ow + j0).
    let wv = if wrap || two_d { wide } else { ow };
    // (position on the grid, columns, position in the output when the tile stores there directly)
    let tiles: Vec<(usize, usize, Option<usize>)> = if wrap {
        let total = rows * wv;
        (0..total).step_by(nr).map(|q0| (q0, nr.min(total - q0), (wv == ow).then_some(q0))).collect()
    } else {
        (0..rows)
            .flat_map(|r| (0..ow).step_by(nr).map(move |j0| (r * wv + j0, nr.min(ow - j0), Some(r * ow + j0))))
            .collect()
    };
    let geo = Grid { wv, wrap, rows };
    let padded = two_d.then(|| pad_input(s, x, wv, nr));
    // SAFETY: pad_input's buffer holds f32s (64-byte aligned), all written.
    let padded_f32 = padded.as_ref().map(|p| {
        let bytes = p.buf.as_slice();
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, bytes.len() / size_of::<f32>()) }
    });
    // The offset of every (channel, tap) row of a tile from its first position, in the padded
    // copy or in the patch.
    let offs: Vec<usize> = match &padded {
        Some(p) => (0..cpg).flat_map(|c| (0..kh).flat_map(move |b| (0..kw).map(move |t| p.offset(c, b, t)))).collect(),
        None => patch_offsets(g, cpg, unit, run),
    };
    let plane = padded.as_ref().map_or(0, |p| p.plane);
    let max_off = offs.iter().copied().max().unwrap_or(0);
    // Tasks: (image, group, block of tiles), about four per thread.
    let threads = crate::cpu::par::threads();
    let units = s.n * s.group;
    let per = if threads > 1 {
        tiles.len().div_ceil((4 * threads).div_ceil(units)).max(1)
    } else {
        tiles.len()
    };
    let tasks: Vec<(usize, usize, usize)> = (0..units)
        .flat_map(|u| (0..tiles.len()).step_by(per).map(move |t| (u / s.group, u % s.group, t)))
        .collect();
    let out = OutPtr(y.as_mut_ptr());
    let ylen = y.len();
    let epi = Epilogue::new(None, act);
    crate::cpu::par::for_each(&tasks, |&(b, grp, t0)| {
        let out = out;
        let xg = &x[(b * s.c + grp * cpg) * insz..][..cpg * insz];
        let ag = &apack[grp * panels * kdim * mr..][..panels * kdim * mr];
        with_scratch(|buf, tbuf| {
            let patch = buf.get(if padded_f32.is_some() { 0 } else { patch_len });
            let tile = tbuf.get(if wrap && wv != ow { mr * nr } else { 0 });
            for &(q0, cols, direct) in &tiles[t0..(t0 + per).min(tiles.len())] {
                let src = match padded_f32 {
                    Some(p) => {
                        let first = (b * s.c + grp * cpg) * plane + q0;
                        // The kernel reads nr floats at first + every offset; pad_input leaves
                        // that much slack after the last plane.
                        assert!(first + max_off + nr <= p.len());
                        p[first..].as_ptr()
                    }
                    None => {
                        patch[runs * run..].fill(0.0);
                        fill_patch(s, xg, cpg, &geo, q0, unit, run, &mut patch[..runs * run]);
                        patch.as_ptr()
                    }
                };
                for (pi, m0) in (0..mpg).step_by(mr).enumerate() {
                    let h = mr.min(mpg - m0);
                    let plane0 = (b * s.m + grp * mpg + m0) * outsz;
                    let a = ag[pi * kdim * mr..].as_ptr();
                    if let Some(pos) = direct {
                        let first = plane0 + pos;
                        assert!(first + (h - 1) * outsz + cols <= ylen);
                        // SAFETY: rows m0..m0+h of this image and group, positions q0..q0+cols
                        // lie in y (checked) and belong to this task alone.
                        unsafe {
                            let c = out.0.add(first);
                            if let Some(bias) = bias {
                                for i in 0..h {
                                    std::slice::from_raw_parts_mut(c.add(i * outsz), cols).fill(bias[grp * mpg + m0 + i]);
                                }
                            }
                            (kern.gather)(h, cols, kdim, a, src, offs.as_ptr(), c, outsz, 1.0, bias.is_some());
                            apply_epilogue(kern.isa, c, outsz, h, cols, 0, &epi);
                        }
                        continue;
                    }
                    if let Some(bias) = bias {
                        for (i, row) in tile.chunks_exact_mut(nr).take(h).enumerate() {
                            row.fill(bias[grp * mpg + m0 + i]);
                        }
                    }
                    // SAFETY: the tile holds h ≤ mr rows of nr ≥ cols floats.
                    unsafe {
                        (kern.gather)(h, cols, kdim, a, src, offs.as_ptr(), tile.as_mut_ptr(), nr, 1.0, bias.is_some());
                        apply_epilogue(kern.isa, tile.as_mut_ptr(), nr, h, cols, 0, &epi);
                    }
                    geo.segments(q0, cols, |r, col, at, len| {
                        if r >= rows || col >= ow {
                            return;
                        }
                        let len = len.min(ow - col);
                        for (i, trow) in tile.chunks_exact(nr).take(h).enumerate() {
                            let start = plane0 + i * outsz + r * ow + col;
                            assert!(start + len <= ylen);
                            // SAFETY: in bounds (checked); output row r, columns col..col+len of
                            // these channels belong to this task alone.
                            unsafe { std::ptr::copy_nonoverlapping(trow[at..at + len].as_ptr(), out.0.add(start), len) };
                        }
                    });
                }
            }
        });
    });
    Ok(())
}

/// The input of a 2-D convolution with its zero padding, split by stride phase: plane p, row phase
/// ρ < sh and column phase φ < sw hold sub-plane rows r of `wv` values, value j being padded input
/// (r·sh + ρ, j·sw + φ). Output (oh, ow) tap (b, t) then reads sub-plane (b·dh mod sh, t·dw mod sw)
/// at row oh + ⌊b·dh/sh⌋, column ow + ⌊t·dw/sw⌋: a fixed offset from position oh·wv + ow.
struct Padded {
    buf: Buffer,
    wv: usize,
    sub: usize,
    plane: usize,
    stride: [usize; 2],
    dilation: [usize; 2],
}

impl Padded {
    /// Offset of (channel c, kernel row b, kernel column t) from a position's own index.
    fn offset(&self, c: usize, b: usize, t: usize) -> usize {
        let ([sh, sw], [dh, dw]) = (self.stride, self.dilation);
        c * self.plane + ((b * dh % sh) * sw + t * dw % sw) * self.sub + (b * dh / sh) * self.wv + t * dw / sw
    }
}

/// `Padded` for x, sub-plane rows `wv` wide, with slack after the last plane for a kernel that
/// reads `nr` floats from every row start.
fn pad_input(s: &ConvShape, x: &[f32], wv: usize, nr: usize) -> Padded {
    let g = &s.geo;
    let [_, ih, iw] = g.input;
    let ([_, sh, sw], [_, dh, dw]) = (g.stride, g.dilation);
    let prow = g.output[1] + (g.kernel[1] - 1) * dh / sh;
    let sub = prow * wv;
    let plane = sh * sw * sub;
    let planes = s.n * s.c;
    let len = planes * plane + nr + wv + (g.kernel[2] - 1) * dw / sw;
    let mut buf = Buffer::recycled(len * size_of::<f32>());
    let bytes = buf.make_mut();
    // SAFETY: a fresh 64-byte aligned heap buffer of exactly len f32s, initialised bytes (any bit
    // pattern is an f32); every element is written below.
    let dst = unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut f32, len) };
    let (body, slack) = dst.split_at_mut(planes * plane);
    slack.fill(0.0);
    let fill = |p: usize, dp: &mut [f32]| {
        let xc = &x[p * ih * iw..][..ih * iw];
        for (ph, dsub) in dp.chunks_exact_mut(sub).enumerate() {
            let (rho, phi) = (ph / sw, ph % sw);
            for (r, drow) in dsub.chunks_exact_mut(wv).enumerate() {
                let Some(h) = (r * sh + rho).checked_sub(g.pad[1]).filter(|&h| h < ih) else {
                    drow.fill(0.0);
                    continue;
                };
                let row = &xc[h * iw..][..iw];
                let start = phi as isize - g.pad[2] as isize;
                if sw == 1 {
                    copy_clipped(row, start, drow);
                } else {
                    for (j, v) in drow.iter_mut().enumerate() {
                        let c = (j * sw) as isize + start;
                        *v = if c >= 0 && (c as usize) < iw { row[c as usize] } else { 0.0 };
                    }
                }
            }
        }
    };
    if crate::cpu::par::threads() > 1 && body.len() >= 1 << 16 {
        body.par_chunks_mut(plane).enumerate().for_each(|(p, dp)| fill(p, dp));
    } else {
        body.chunks_mut(plane).enumerate().for_each(|(p, dp)| fill(p, dp));
    }
    Padded { buf, wv, sub, plane, stride: [sh, sw], dilation: [dh, dw] }
}

/// Offsets of every (channel, tap) row in a patch of `run`-float runs (see `fill_patch`).
fn patch_offsets(g: &Geo3, cpg: usize, unit: bool, run: usize) -> Vec<usize> {
    let [kd, kh, kw] = g.kernel;
    let mut offs = Vec::with_capacity(cpg * kd * kh * kw);
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
    offs
}

/// The virtual output grid of `conv_direct_f32`: `rows` rows of `wv` positions, the first ow of
/// each an output column; tiles run on across rows when `wrap`.
struct Grid {
    wv: usize,
    wrap: bool,
    rows: usize,
}

impl Grid {
    /// Split virtual positions q0..q0+len into per-row segments: f(row, column, offset from q0,
    /// length). Without `wrap` the whole span belongs to q0's row (its columns may pass wv).
    #[inline]
    fn segments(&self, q0: usize, len: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut at = 0;
        while at < len {
            let v = q0 + at;
            let (r, col) = (v / self.wv, v % self.wv);
            let n = if self.wrap { (len - at).min(self.wv - col) } else { len - at };
            f(r, col, at, n);
            at += n;
        }
    }
}

/// Copy the input window of the tile at virtual position q0 into `patch` (zeros where the window
/// hangs over the padding, past the input or past the last row).
#[allow(clippy::too_many_arguments)]
fn fill_patch(s: &ConvShape, xg: &[f32], cpg: usize, grid: &Grid, q0: usize, unit: bool, run: usize, patch: &mut [f32]) {
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
            for b in 0..kh {
                // The input row read by virtual row r for taps (a, b), if any.
                let row_of = |r: usize| {
                    if r >= grid.rows {
                        return None;
                    }
                    let (od, oh) = (r / g.output[1], r % g.output[1]);
                    match (at(0, od, a), at(1, oh, b)) {
                        (Some(d), Some(h)) => Some(&xc[(d * ih + h) * iw..][..iw]),
                        _ => None,
                    }
                };
                let taps = if unit { 1 } else { kw };
                for t in 0..taps {
                    let dst = seg.next().expect("patch sized for every run");
                    grid.segments(q0, run, |r, col, off, len| {
                        let dst = &mut dst[off..off + len];
                        let Some(row) = row_of(r) else {
                            dst.fill(0.0);
                            return;
                        };
                        if unit {
                            // Columns col - pad .. of the input row.
                            copy_clipped(row, col as isize - g.pad[2] as isize, dst);
                        } else {
                            let (sw, off) = (g.stride[2], (t * g.dilation[2]) as isize - g.pad[2] as isize);
                            for (j, v) in dst.iter_mut().enumerate() {
                                let src = ((col + j) * sw) as isize + off;
                                *v = if src >= 0 && (src as usize) < iw { row[src as usize] } else { 0.0 };
                            }
                        }
                    });
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
