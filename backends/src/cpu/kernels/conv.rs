//! Convolutions: Conv, ConvTranspose, ConvInteger, QLinearConv, DeformConv, CausalConvWithState.
//!
//! Conv lowers to im2col + GEMM per (image, group), tiled over output rows so the column buffer
//! stays a few MB; 1x1 stride-1 unpadded kernels skip im2col, and depthwise convolutions
//! (one input channel per group) run a direct loop instead. ConvTranspose is GEMM + col2im.
//! Integer convolutions reuse the same code with exact i32 arithmetic. Geometry is padded to three
//! spatial dims (unit leading dims) so one code path serves 1-D, 2-D and 3-D.

use std::cell::RefCell;

use half::{bf16, f16};
use kiln_runtime::{DType, Error, Result, Tensor};
use rayon::prelude::*;

use super::matmul::{gemm, quant_range, quant_tensor, requant_multiplier, requantize, Mat, MatElem};
use super::conv_direct;
use super::pool::{spatial_geometry, DimGeom};
use crate::cpu::ctx::OpCtx;
use crate::cpu::gemm::pack::AlignedBuf;
use crate::cpu::gemm::{apply_act, sgemm, Act, BRef, Epilogue, MatRef, SKINNY_M};
use crate::cpu::isa::{self, Isa};
use crate::cpu::registry::Registry;

pub fn register(r: &mut Registry) {
    r.add("Conv", conv);
    r.add("ConvTranspose", conv_transpose);
    r.add("ConvInteger", conv_integer);
    r.add("QLinearConv", qlinear_conv);
    r.add("DeformConv", deform_conv);
    r.add("CausalConvWithState", causal_conv_with_state);
}

/// Target size (elements) of one im2col tile.
const COL_TILE: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

/// Convolution geometry padded to three spatial dims.
#[derive(Clone, Debug)]
pub(super) struct Geo3 {
    pub(super) input: [usize; 3],
    pub(super) output: [usize; 3],
    pub(super) kernel: [usize; 3],
    pub(super) stride: [usize; 3],
    pub(super) dilation: [usize; 3],
    pub(super) pad: [usize; 3],
}

impl Geo3 {
    fn new(dims: &[DimGeom]) -> Result<Geo3> {
        if dims.is_empty() || dims.len() > 3 {
            return Err(Error::Other(format!("convolution over {} spatial dims is not supported", dims.len())));
        }
        let mut g = Geo3 { input: [1; 3], output: [1; 3], kernel: [1; 3], stride: [1; 3], dilation: [1; 3], pad: [0; 3] };
        let off = 3 - dims.len();
        for (i, d) in dims.iter().enumerate() {
            g.input[off + i] = d.input;
            g.output[off + i] = d.output;
            g.kernel[off + i] = d.kernel;
            g.stride[off + i] = d.stride;
            g.dilation[off + i] = d.dilation;
            g.pad[off + i] = d.pad_begin;
        }
        Ok(g)
    }

    pub(super) fn in_size(&self) -> usize {
        self.input.iter().product()
    }

    pub(super) fn out_size(&self) -> usize {
        self.output.iter().product()
    }

    fn k_size(&self) -> usize {
        self.kernel.iter().product()
    }

    /// Output indices `o` of dim `i` whose tap `kk` lands inside the input:
    /// `0 <= o*s + kk*d - pad < input`.
    fn valid(&self, i: usize, kk: usize) -> (usize, usize) {
        let (s, off) = (self.stride[i] as isize, (kk * self.dilation[i]) as isize - self.pad[i] as isize);
        let inp = self.input[i] as isize;
        let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
        let hi = if inp - 1 - off < 0 { 0 } else { (inp - 1 - off) / s + 1 };
        let hi = (hi as usize).min(self.output[i]);
        ((lo as usize).min(hi), hi)
    }

    /// Input index of output `o`, tap `kk` along dim `i` (only meaningful inside `valid`).
    fn src(&self, i: usize, o: usize, kk: usize) -> usize {
        o * self.stride[i] + kk * self.dilation[i] - self.pad[i]
    }

    /// The same convolution without its trivial spatial dims (input, output and kernel 1, no
    /// padding), the others right-aligned. NC… memory is unchanged, but a [H, 1] conv (TF-exported
    /// 1-D convs, Magika's 5×1) becomes a row of H, which the row-oriented kernels vectorize
    /// instead of walking H rows of one element.
    pub(super) fn squeezed(&self) -> Geo3 {
        let keep: Vec<usize> =
            (0..3).filter(|&i| !(self.input[i] == 1 && self.output[i] == 1 && self.kernel[i] == 1 && self.pad[i] == 0)).collect();
        let mut g = Geo3 { input: [1; 3], output: [1; 3], kernel: [1; 3], stride: [1; 3], dilation: [1; 3], pad: [0; 3] };
        let off = 3 - keep.len();
        for (j, &i) in keep.iter().enumerate() {
            g.input[off + j] = self.input[i];
            g.output[off + j] = self.output[i];
            g.kernel[off + j] = self.kernel[i];
            g.stride[off + j] = self.stride[i];
            g.dilation[off + j] = self.dilation[i];
            g.pad[off + j] = self.pad[i];
        }
        g
    }

    pub(super) fn is_pointwise(&self) -> bool {
        self.kernel == [1; 3] && self.stride == [1; 3] && self.pad == [0; 3] && self.input == self.output
    }
}

/// Kernel shape from the attribute or W's trailing dims.
fn kernel_dims(ctx: &OpCtx, w: &Tensor) -> Result<Vec<usize>> {
    let from_w = w.shape()[2..].to_vec();
    match ctx.attr_ints("kernel_shape") {
        Some(k) => {
            let k: Vec<usize> = k.into_iter().map(|v| v.max(0) as usize).collect();
            if k != from_w {
                return Err(Error::Shape(format!("kernel_shape {k:?} does not match W of shape {:?}", w.shape())));
            }
            Ok(k)
        }
        None => Ok(from_w),
    }
}

/// Checked shapes of a forward convolution.
pub(super) struct ConvShape {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) m: usize,
    pub(super) group: usize,
    pub(super) geo: Geo3,
    out_shape: Vec<usize>,
}

pub(super) fn conv_shape(ctx: &OpCtx, x: &Tensor, w: &Tensor) -> Result<ConvShape> {
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(Error::Shape(format!("Conv: X {:?} and W {:?} need equal rank >= 3", x.shape(), w.shape())));
    }
    let group = ctx.attr_i("group", 1);
    let (n, c, m) = (x.shape()[0], x.shape()[1], w.shape()[0]);
    if group <= 0 || c % group as usize != 0 || m % group as usize != 0 || w.shape()[1] * group as usize != c {
        return Err(Error::Shape(format!(
            "Conv: X {:?}, W {:?} and group {group} do not agree",
            x.shape(),
            w.shape()
        )));
    }
    let k = kernel_dims(ctx, w)?;
    let dims = spatial_geometry(ctx, &x.shape()[2..], &k, false)?;
    let mut out_shape = vec![n, m];
    out_shape.extend(dims.iter().map(|d| d.output));
    Ok(ConvShape { n, c, m, group: group as usize, geo: Geo3::new(&dims)?, out_shape })
}

// ---------------------------------------------------------------------------------------------
// Forward convolution core
// ---------------------------------------------------------------------------------------------

/// `y = conv(x, w) + bias` over contiguous NC... buffers; `y` is written entirely.
fn conv_core<T: MatElem>(s: &ConvShape, x: &[T], w: &[T], bias: Option<&[T]>, y: &mut [T]) -> Result<()> {
    let g = &s.geo;
    let (insz, outsz, ksz) = (g.in_size(), g.out_size(), g.k_size());
    let (cpg, mpg) = (s.c / s.group, s.m / s.group);
    if x.len() != s.n * s.c * insz || w.len() != s.m * cpg * ksz || y.len() != s.n * s.m * outsz {
        return Err(Error::Shape("Conv: buffer sizes do not match the shapes".into()));
    }
    // Start from the bias so the products accumulate onto it.
    for (i, plane) in y.chunks_mut(outsz.max(1)).enumerate() {
        plane.fill(bias.map_or(T::ZERO, |b| b[i % s.m]));
    }
    if outsz == 0 {
        return Ok(());
    }
    if cpg == 1 && s.group > 1 {
        depthwise(s, x, w, y);
        return Ok(());
    }
    let kdim = cpg * ksz;
    let ow = g.output[2];
    let out_rows = outsz / ow.max(1);
    let tile_rows = (COL_TILE / (kdim * ow).max(1)).clamp(1, out_rows.max(1));
    let mut col: Vec<T> = if g.is_pointwise() { Vec::new() } else { vec![T::ZERO; kdim * tile_rows * ow] };
    for b in 0..s.n {
        for grp in 0..s.group {
            let xg = &x[(b * s.c + grp * cpg) * insz..][..cpg * insz];
            let wg = &w[grp * mpg * kdim..][..mpg * kdim];
            let yg = &mut y[(b * s.m + grp * mpg) * outsz..][..mpg * outsz];
            if g.is_pointwise() {
                gemm(mpg, outsz, kdim, Mat::rows(wg, kdim), Mat::rows(xg, insz), true, yg, outsz, true)?;
                continue;
            }
            let mut r0 = 0;
            while r0 < out_rows {
                let nr = tile_rows.min(out_rows - r0);
                let ncols = nr * ow;
                let col = &mut col[..kdim * ncols];
                im2col(g, xg, r0, nr, col);
                gemm(mpg, ncols, kdim, Mat::rows(wg, kdim), Mat::rows(col, ncols), true, &mut yg[r0 * ow..], outsz, true)?;
                r0 += nr;
            }
        }
    }
    Ok(())
}

/// Fill `col` ([cpg·k, nr·OW]) with the input patches of output rows `r0..r0+nr`
/// (an output row is one (od, oh) pair).
fn im2col<T: MatElem>(g: &Geo3, x: &[T], r0: usize, nr: usize, col: &mut [T]) {
    let ksz = g.k_size();
    let (ow, oh) = (g.output[2], g.output[1]);
    let insz = g.in_size();
    let (ih, iw) = (g.input[1], g.input[2]);
    let ncols = nr * ow;
    crate::cpu::par::chunks_mut(col, ncols, |r, crow| {
        let (c, kk) = (r / ksz, r % ksz);
        let (kd, kh, kw) = (kk / (g.kernel[1] * g.kernel[2]), kk / g.kernel[2] % g.kernel[1], kk % g.kernel[2]);
        let xc = &x[c * insz..(c + 1) * insz];
        let (vd, vh, vw) = (g.valid(0, kd), g.valid(1, kh), g.valid(2, kw));
        let (s2, d2) = (g.stride[2], kw * g.dilation[2]);
        for (q, dst) in crow.chunks_mut(ow).enumerate() {
            let row = r0 + q;
            let (od, ohh) = (row / oh, row % oh);
            if od < vd.0 || od >= vd.1 || ohh < vh.0 || ohh >= vh.1 {
                dst.fill(T::ZERO);
                continue;
            }
            let base = (g.src(0, od, kd) * ih + g.src(1, ohh, kh)) * iw;
            dst[..vw.0].fill(T::ZERO);
            dst[vw.1..].fill(T::ZERO);
            if vw.0 < vw.1 {
                let first = base + vw.0 * s2 + d2 - g.pad[2];
                if s2 == 1 {
                    dst[vw.0..vw.1].copy_from_slice(&xc[first..first + (vw.1 - vw.0)]);
                } else {
                    for (j, v) in dst[vw.0..vw.1].iter_mut().enumerate() {
                        *v = xc[first + j * s2];
                    }
                }
            }
        }
    });
}

/// Direct convolution when every group has one input channel (M = C · multiplier). Works one
/// output row at a time so the row and the few input rows it reads stay in L1.
fn depthwise<T: MatElem>(s: &ConvShape, x: &[T], w: &[T], y: &mut [T]) {
    let g = &s.geo;
    let (insz, outsz, ksz) = (g.in_size(), g.out_size(), g.k_size());
    let mult = s.m / s.c;
    let (od_n, oh_n, ow) = (g.output[0], g.output[1], g.output[2]);
    let (ih, iw) = (g.input[1], g.input[2]);
    let [kd_n, kh_n, kw_n] = g.kernel;
    let vd: Vec<(usize, usize)> = (0..kd_n).map(|k| g.valid(0, k)).collect();
    let vh: Vec<(usize, usize)> = (0..kh_n).map(|k| g.valid(1, k)).collect();
    let vw: Vec<(usize, usize)> = (0..kw_n).map(|k| g.valid(2, k)).collect();
    let s2 = g.stride[2];
    crate::cpu::par::chunks_mut(y, outsz, |p, yp| {
        let (b, m) = (p / s.m, p % s.m);
        let xc = &x[(b * s.c + m / mult) * insz..][..insz];
        let wk = &w[m * ksz..(m + 1) * ksz];
        for od in 0..od_n {
            for ohh in 0..oh_n {
                let dst = &mut yp[(od * oh_n + ohh) * ow..][..ow];
                for kd in (0..kd_n).filter(|&k| od >= vd[k].0 && od < vd[k].1) {
                    for kh in (0..kh_n).filter(|&k| ohh >= vh[k].0 && ohh < vh[k].1) {
                        let xr = &xc[(g.src(0, od, kd) * ih + g.src(1, ohh, kh)) * iw..][..iw];
                        for (kw, &(lo, hi)) in vw.iter().enumerate() {
                            if lo >= hi {
                                continue;
                            }
                            let wv = wk[(kd * kh_n + kh) * kw_n + kw];
                            let first = lo * s2 + kw * g.dilation[2] - g.pad[2];
                            let d = &mut dst[lo..hi];
                            if s2 == 1 {
                                let len = d.len();
                                for (o, &v) in d.iter_mut().zip(&xr[first..first + len]) {
                                    *o = o.add(wv.mul(v));
                                }
                            } else {
                                for (o, &v) in d.iter_mut().zip(xr[first..].iter().step_by(s2)) {
                                    *o = o.add(wv.mul(v));
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// f32: packed GEMM per output tile with bias and activation fused, direct depthwise kernel
// ---------------------------------------------------------------------------------------------

/// Floats of one task's working set (im2col tile + output tile) kept within L2.
const TILE_FLOATS: usize = 128 * 1024;
/// Multiply-adds below which a convolution stays on the calling thread.
pub(super) const PAR_MIN_WORK: usize = 1 << 20;

thread_local! {
    /// Per-thread scratch reused across calls: (im2col tile or padded plane, output tile).
    static SCRATCH: RefCell<(AlignedBuf, AlignedBuf)> = RefCell::new(Default::default());
}

/// Run `f` with this thread's scratch buffers (fresh ones if they are already in use).
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut AlignedBuf, &mut AlignedBuf) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            let (a, b) = &mut *s;
            f(a, b)
        }
        Err(_) => f(&mut AlignedBuf::default(), &mut AlignedBuf::default()),
    })
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: every task writes its own rows × columns block of the output (see `conv_gemm_f32`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// f32 Conv with bias and `act` fused, into a new tensor (every element written once).
fn conv_f32_tensor(s: &ConvShape, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Act) -> Result<Tensor> {
    let bias = b.map(|b| b.view::<f32>()).transpose()?;
    if bias.is_some_and(|bv| bv.len() != s.m) {
        return Err(Error::Shape(format!("Conv: bias has {} elements, expected {}", bias.map_or(0, |b| b.len()), s.m)));
    }
    let (xv, wv) = (x.view::<f32>()?, w.view::<f32>()?);
    Tensor::filled_by::<f32>(DType::F32, &s.out_shape, |y| conv_f32(s, xv, wv, bias, act, y))
}

/// `y = act(conv(x, w) + bias)` over contiguous f32 NC... buffers; `y` is written entirely.
fn conv_f32(s: &ConvShape, x: &[f32], w: &[f32], bias: Option<&[f32]>, act: Act, y: &mut [f32]) -> Result<()> {
    let squeezed = ConvShape { geo: s.geo.squeezed(), out_shape: Vec::new(), ..*s };
    let s = &squeezed;
    let g = &s.geo;
    let (insz, outsz, ksz) = (g.in_size(), g.out_size(), g.k_size());
    let cpg = s.c / s.group;
    if x.len() != s.n * s.c * insz || w.len() != s.m * cpg * ksz || y.len() != s.n * s.m * outsz {
        return Err(Error::Shape("Conv: buffer sizes do not match the shapes".into()));
    }
    if y.is_empty() {
        return Ok(());
    }
    if cpg == 1 && s.group > 1 {
        depthwise_f32(s, x, w, bias, act, y);
        return Ok(());
    }
    if conv_direct::suits(s) {
        return conv_direct::conv_direct_f32(s, x, w, bias, act, y);
    }
    conv_gemm_f32(s, x, w, bias, act, y)
}

/// One GEMM task: output rows `m0..m1` of group `grp` of image `b`, output positions `j0..j1`.
#[derive(Clone, Copy, Debug)]
struct Task {
    b: usize,
    grp: usize,
    m0: usize,
    m1: usize,
    j0: usize,
    j1: usize,
}

/// Conv as GEMM: per task, `C[rows, cols] = W_g[rows, :] · B[:, cols]` where B is the input itself
/// (1x1 stride-1 unpadded) or an im2col tile in per-thread scratch. The bias is written into C
/// first and the activation runs in the GEMM epilogue, so C is touched once more at most, in L2.
fn conv_gemm_f32(s: &ConvShape, x: &[f32], w: &[f32], bias: Option<&[f32]>, act: Act, y: &mut [f32]) -> Result<()> {
    let g = &s.geo;
    let outsz = g.out_size();
    let (cpg, mpg) = (s.c / s.group, s.m / s.group);
    let kdim = cpg * g.k_size();
    let threads = crate::cpu::par::threads();
    let par = threads > 1 && s.n * s.m * outsz * kdim.max(1) >= PAR_MIN_WORK;
    let units = s.n * s.group;
    // Column tile: its im2col block and output block together fit the L2 budget.
    let per_col = mpg + if g.is_pointwise() { 0 } else { kdim };
    let mut cols = (TILE_FLOATS / per_col.max(1) / 32 * 32).max(32).min(outsz);
    if par && units * outsz.div_ceil(cols) < 2 * threads {
        cols = outsz.div_ceil((2 * threads).div_ceil(units)).next_multiple_of(32).min(outsz);
    }
    let ntiles = outsz.div_ceil(cols);
    // Split the output channels too when there are still fewer tasks than threads.
    let mblocks = if par && units * ntiles < threads && mpg >= 32 { threads } else { 1 };
    let mrows = mpg.div_ceil(mblocks).next_multiple_of(8).min(mpg);
    let mut tasks = Vec::with_capacity(units * ntiles * mblocks);
    for b in 0..s.n {
        for grp in 0..s.group {
            for m0 in (0..mpg).step_by(mrows.max(1)) {
                for j0 in (0..outsz).step_by(cols) {
                    tasks.push(Task { b, grp, m0, m1: (m0 + mrows).min(mpg), j0, j1: (j0 + cols).min(outsz) });
                }
            }
        }
    }
    let run = |t: &Task, c: &mut [f32], ldc: usize, col: &mut AlignedBuf| gemm_task(s, x, w, bias, act, t, c, ldc, col);
    if !par {
        return with_scratch(|col, _| {
            tasks.iter().try_for_each(|t| {
                let start = (t.b * s.m + t.grp * mpg + t.m0) * outsz + t.j0;
                run(t, &mut y[start..], outsz, col)
            })
        });
    }
    // Tasks compute into their own tile and copy it out: their output blocks interleave in y.
    let out = OutPtr(y.as_mut_ptr());
    let ylen = y.len();
    crate::cpu::par::try_for_each(&tasks, |t| {
        with_scratch(|col, tile| {
            let (rows, ncols) = (t.m1 - t.m0, t.j1 - t.j0);
            let c = tile.get(rows * ncols);
            run(t, c, ncols, col)?;
            for (i, src) in c.chunks_exact(ncols).enumerate() {
                let start = (t.b * s.m + t.grp * mpg + t.m0 + i) * outsz + t.j0;
                assert!(start + ncols <= ylen);
                let out = out;
                // SAFETY: in bounds (checked); tasks cover disjoint (row, column) blocks of y.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), out.0.add(start), ncols) };
            }
            Ok(())
        })
    })
}

/// One task's GEMM into `c` (rows `ldc` apart, starting at the task's first element).
#[allow(clippy::too_many_arguments)]
fn gemm_task(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    act: Act,
    t: &Task,
    c: &mut [f32],
    ldc: usize,
    col: &mut AlignedBuf,
) -> Result<()> {
    let g = &s.geo;
    let (insz, outsz) = (g.in_size(), g.out_size());
    let (cpg, mpg) = (s.c / s.group, s.m / s.group);
    let kdim = cpg * g.k_size();
    let (rows, ncols) = (t.m1 - t.m0, t.j1 - t.j0);
    let m_first = t.grp * mpg + t.m0;
    let xg = &x[(t.b * s.c + t.grp * cpg) * insz..][..cpg * insz];
    let wg = &w[m_first * kdim..][..rows * kdim];
    if ncols <= SKINNY_M {
        // A few output positions (1-D audio frames, a tail tile): Cᵀ = Bᵀ·Wᵀ takes the skinny
        // path, which reads W in place; the tiled path would pack all of W for ≤ 4 columns.
        let at = if g.is_pointwise() {
            MatRef::new(&xg[t.j0..], 1, insz)
        } else {
            let patches = col.get(kdim * ncols);
            for (j, row) in patches.chunks_exact_mut(kdim).enumerate() {
                im2row(g, xg, cpg, t.j0 + j, row);
            }
            MatRef::rows(patches, kdim)
        };
        let mut ct = vec![0f32; ncols * rows];
        let epi = Epilogue::new(bias.map(|b| &b[m_first..m_first + rows]), act);
        sgemm(ncols, rows, kdim, at, BRef::Mat(MatRef::new(wg, 1, kdim)), &mut ct, rows, false, &epi, false)?;
        for (j, crow) in ct.chunks_exact(rows).enumerate() {
            for (i, &v) in crow.iter().enumerate() {
                c[i * ldc + j] = v;
            }
        }
        return Ok(());
    }
    if let Some(bias) = bias {
        for (row, &bv) in c.chunks_mut(ldc).zip(&bias[m_first..m_first + rows]) {
            row[..ncols].fill(bv);
        }
    }
    let a = MatRef::rows(wg, kdim);
    let epi = Epilogue::new(None, act);
    let acc = bias.is_some();
    if g.is_pointwise() {
        let bm = MatRef::rows(&xg[t.j0..], insz);
        debug_assert_eq!(outsz, insz);
        return sgemm(rows, ncols, kdim, a, BRef::Mat(bm), c, ldc, acc, &epi, false);
    }
    let colbuf = col.get(kdim * ncols);
    im2col_range(g, xg, cpg, t.j0, t.j1, colbuf);
    sgemm(rows, ncols, kdim, a, BRef::Mat(MatRef::rows(colbuf, ncols)), c, ldc, acc, &epi, false)
}

/// Fill `col` ([channels·k, j1-j0], row-major) with the input patches of output positions
/// `j0..j1` (flat indices over the output's spatial dims). Every element is written.
fn im2col_range(g: &Geo3, x: &[f32], channels: usize, j0: usize, j1: usize, col: &mut [f32]) {
    let ksz = g.k_size();
    let ncols = j1 - j0;
    let (oh, ow) = (g.output[1], g.output[2]);
    let (ih, iw) = (g.input[1], g.input[2]);
    let insz = g.in_size();
    for (r, crow) in col.chunks_exact_mut(ncols).take(channels * ksz).enumerate() {
        let (c, kk) = (r / ksz, r % ksz);
        let (kd, kh, kw) = (kk / (g.kernel[1] * g.kernel[2]), kk / g.kernel[2] % g.kernel[1], kk % g.kernel[2]);
        let xc = &x[c * insz..(c + 1) * insz];
        let (vd, vh, vw) = (g.valid(0, kd), g.valid(1, kh), g.valid(2, kw));
        let (s2, off2) = (g.stride[2], kw * g.dilation[2]);
        let mut j = j0;
        while j < j1 {
            let (row, lo) = (j / ow, j % ow);
            let hi = ow.min(lo + (j1 - j));
            let dst = &mut crow[j - j0..][..hi - lo];
            let (od, ohh) = (row / oh, row % oh);
            if od < vd.0 || od >= vd.1 || ohh < vh.0 || ohh >= vh.1 {
                dst.fill(0.0);
            } else {
                let base = (g.src(0, od, kd) * ih + g.src(1, ohh, kh)) * iw;
                let (a, b) = (vw.0.clamp(lo, hi), vw.1.clamp(lo, hi));
                dst[..a - lo].fill(0.0);
                dst[b - lo..].fill(0.0);
                if a < b {
                    let first = base + a * s2 + off2 - g.pad[2];
                    let d = &mut dst[a - lo..b - lo];
                    if s2 == 1 {
                        d.copy_from_slice(&xc[first..first + d.len()]);
                    } else {
                        for (v, &src) in d.iter_mut().zip(xc[first..].iter().step_by(s2)) {
                            *v = src;
                        }
                    }
                }
            }
            j += hi - lo;
        }
    }
}

/// The patch of output position `j` (flat over the output's spatial dims) as one row:
/// `row[c·k + kk]` for every channel and tap, zero where the window hangs over the padding. Runs
/// of kernel width are single copies when undilated and inside the input.
fn im2row(g: &Geo3, x: &[f32], channels: usize, j: usize, row: &mut [f32]) {
    let [_, oh, ow] = g.output;
    let o = [j / (oh * ow), j / ow % oh, j % ow];
    let [kd_n, kh_n, kw_n] = g.kernel;
    let insz = g.in_size();
    // Input coordinate of output o, tap kk along dim i (None: in the padding).
    let at = |i: usize, kk: usize| (o[i] * g.stride[i] + kk * g.dilation[i]).checked_sub(g.pad[i]).filter(|&v| v < g.input[i]);
    let w0 = (o[2] * g.stride[2]).checked_sub(g.pad[2]);
    let contiguous = g.dilation[2] == 1 && w0.is_some_and(|w| w + kw_n <= g.input[2]);
    for (c, rc) in row.chunks_exact_mut(kd_n * kh_n * kw_n).take(channels).enumerate() {
        let xc = &x[c * insz..][..insz];
        for (dh, run) in rc.chunks_exact_mut(kw_n).enumerate() {
            let (Some(d), Some(h)) = (at(0, dh / kh_n), at(1, dh % kh_n)) else {
                run.fill(0.0);
                continue;
            };
            let base = (d * g.input[1] + h) * g.input[2];
            match w0 {
                Some(w) if contiguous => run.copy_from_slice(&xc[base + w..base + w + kw_n]),
                _ => {
                    for (kw, v) in run.iter_mut().enumerate() {
                        *v = at(2, kw).map_or(0.0, |w| xc[base + w]);
                    }
                }
            }
        }
    }
}

// ---- depthwise ----

/// One depthwise output plane's operands: a source plane whose (0, 0) is the first window's
/// top-left tap (padding already materialized), rows `ld` apart.
struct DwPlane<'a> {
    src: &'a [f32],
    ld: usize,
    w: &'a [f32],
    bias: f32,
    act: Act,
    out: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
}

/// Depthwise (one input channel per group) f32 conv: per output plane, the input plane is copied
/// with its padding into scratch (skipped when unpadded) so every window lies inside it, then each
/// output row is computed in vector-width chunks with all taps in registers, bias and activation
/// applied while the row is in L1.
fn depthwise_f32(s: &ConvShape, x: &[f32], w: &[f32], bias: Option<&[f32]>, act: Act, y: &mut [f32]) {
    let g = &s.geo;
    if g.kernel[0] != 1 || g.input[0] != 1 || g.output[0] != 1 || g.pad[0] != 0 {
        // 3-D: the generic loop, then bias and activation.
        y.fill(0.0);
        depthwise(s, x, w, y);
        for (p, plane) in y.chunks_mut(g.out_size()).enumerate() {
            let bv = bias.map_or(0.0, |b| b[p % s.m]);
            plane.iter_mut().for_each(|v| *v += bv);
            apply_act(plane, act);
        }
        return;
    }
    depthwise_2d_f32(isa::active(), s, x, w, bias, act, y);
}

/// `depthwise_f32` for 1-D / 2-D geometry with the kernels of `isa` (a supported ISA).
fn depthwise_2d_f32(isa: Isa, s: &ConvShape, x: &[f32], w: &[f32], bias: Option<&[f32]>, act: Act, y: &mut [f32]) {
    let g = &s.geo;
    if super::conv_dw::suits(isa, s) {
        // Narrow output rows: vectors across 16-channel blocks (see `conv_dw::suits`).
        return super::conv_dw::depthwise_blocked_f32(isa, s, x, w, bias, act, y);
    }
    let (insz, outsz, ksz) = (g.in_size(), g.out_size(), g.k_size());
    let mult = s.m / s.c;
    let plane = |p: usize, yp: &mut [f32], buf: &mut AlignedBuf| {
        let m = p % s.m;
        let xc = &x[(p / s.m * s.c + m / mult) * insz..][..insz];
        let (src, ld) = padded_plane(g, xc, buf);
        let args = DwPlane {
            src,
            ld,
            w: &w[m * ksz..(m + 1) * ksz],
            bias: bias.map_or(0.0, |b| b[m]),
            act,
            out: [g.output[1], g.output[2]],
            kernel: [g.kernel[1], g.kernel[2]],
            stride: [g.stride[1], g.stride[2]],
            dilation: [g.dilation[1], g.dilation[2]],
        };
        dw_plane(isa, &args, yp);
    };
    let work = y.len() * ksz;
    if crate::cpu::par::threads() > 1 && work >= PAR_MIN_WORK {
        let min_len = (PAR_MIN_WORK / 16 / (outsz * ksz).max(1)).max(1);
        y.par_chunks_mut(outsz).with_min_len(min_len).enumerate().for_each(|(p, yp)| with_scratch(|buf, _| plane(p, yp, buf)));
    } else {
        with_scratch(|buf, _| y.chunks_mut(outsz).enumerate().for_each(|(p, yp)| plane(p, yp, buf)));
    }
}

/// The input plane extended by its padding (zeros) to exactly the rows and columns the windows
/// read, as (data, row stride); the input itself when no padding is needed.
fn padded_plane<'a>(g: &Geo3, xc: &'a [f32], buf: &'a mut AlignedBuf) -> (&'a [f32], usize) {
    let (ih, iw) = (g.input[1], g.input[2]);
    let rows = (g.output[1] - 1) * g.stride[1] + (g.kernel[1] - 1) * g.dilation[1] + 1;
    let cols = (g.output[2] - 1) * g.stride[2] + (g.kernel[2] - 1) * g.dilation[2] + 1;
    let (pt, pl) = (g.pad[1], g.pad[2]);
    if pt == 0 && pl == 0 && rows <= ih && cols <= iw {
        return (xc, iw);
    }
    let dst = buf.get(rows * cols);
    for (r, drow) in dst.chunks_exact_mut(cols).enumerate() {
        let Some(sr) = r.checked_sub(pt).filter(|&sr| sr < ih) else {
            drow.fill(0.0);
            continue;
        };
        let srow = &xc[sr * iw..(sr + 1) * iw];
        // Columns pl..pl+iw of the padded row hold the input row, clipped to `cols`.
        let a = pl.min(cols);
        let b = (pl + iw).min(cols);
        drow[..a].fill(0.0);
        drow[b..].fill(0.0);
        drow[a..b].copy_from_slice(&srow[..b - a]);
    }
    (dst, cols)
}

/// One depthwise plane with the kernels of `isa`.
fn dw_plane(isa: Isa, p: &DwPlane, y: &mut [f32]) {
    match isa {
        // SAFETY: `isa` is the active ISA, which the CPU supports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { dw_plane_avx512(p, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { dw_plane_avx2(p, y) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => dw_plane_rows::<true>(p, y),
        _ => dw_plane_rows::<false>(p, y),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn dw_plane_avx512(p: &DwPlane, y: &mut [f32]) {
    dw_plane_rows::<true>(p, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_plane_avx2(p: &DwPlane, y: &mut [f32]) {
    dw_plane_rows::<true>(p, y)
}

/// `a·b + c`, fused where the ISA has FMA (no libm call otherwise).
#[inline(always)]
pub(super) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn dw_plane_rows<const FMA: bool>(p: &DwPlane, y: &mut [f32]) {
    let [oh, ow] = p.out;
    for (o, out) in y.chunks_exact_mut(ow).take(oh).enumerate() {
        let top = o * p.stride[0];
        match (p.kernel[1], p.stride[1], p.dilation[1]) {
            (3, 1, 1) => dw_row::<FMA, 3, 1>(p, top, out),
            (3, 2, 1) => dw_row::<FMA, 3, 2>(p, top, out),
            (5, 1, 1) => dw_row::<FMA, 5, 1>(p, top, out),
            (5, 2, 1) => dw_row::<FMA, 5, 2>(p, top, out),
            _ => dw_row_any::<FMA>(p, top, out),
        }
        apply_act(out, p.act);
    }
}

/// Output columns per register block.
const DW_LANES: usize = 16;

/// One output row for kernel width KW, column stride SW, unit column dilation: blocks of
/// DW_LANES outputs accumulate every tap in registers.
#[inline(always)]
fn dw_row<const FMA: bool, const KW: usize, const SW: usize>(p: &DwPlane, top: usize, out: &mut [f32]) {
    let ow = out.len();
    let kh = p.kernel[0];
    let full = ow / DW_LANES * DW_LANES;
    // Each source row read here spans (ow-1)·SW + KW floats from its start.
    let need = (ow.max(1) - 1) * SW + KW;
    for i in 0..kh {
        let start = (top + i * p.dilation[0]) * p.ld;
        assert!(start + need <= p.src.len() && p.w.len() >= kh * KW);
    }
    let mut c0 = 0;
    while c0 < full {
        let mut acc = [p.bias; DW_LANES];
        for i in 0..kh {
            let row = (top + i * p.dilation[0]) * p.ld + c0 * SW;
            for j in 0..KW {
                // SAFETY: row + (c0 + DW_LANES - 1)·SW + j < start + need ≤ src.len() (asserted).
                let wv = unsafe { *p.w.get_unchecked(i * KW + j) };
                for (l, a) in acc.iter_mut().enumerate() {
                    let v = unsafe { *p.src.get_unchecked(row + l * SW + j) };
                    *a = madd::<FMA>(wv, v, *a);
                }
            }
        }
        out[c0..c0 + DW_LANES].copy_from_slice(&acc);
        c0 += DW_LANES;
    }
    for (c, o) in out.iter_mut().enumerate().skip(full) {
        let mut a = p.bias;
        for i in 0..kh {
            let row = &p.src[(top + i * p.dilation[0]) * p.ld + c * SW..][..KW];
            for (&v, &wv) in row.iter().zip(&p.w[i * KW..(i + 1) * KW]) {
                a = madd::<FMA>(wv, v, a);
            }
        }
        *o = a;
    }
}

/// One output row for any kernel width, stride and dilation: tap by tap over the row.
#[inline(always)]
fn dw_row_any<const FMA: bool>(p: &DwPlane, top: usize, out: &mut [f32]) {
    let (kh, kw) = (p.kernel[0], p.kernel[1]);
    let (sw, dw) = (p.stride[1], p.dilation[1]);
    out.fill(p.bias);
    for i in 0..kh {
        let row = &p.src[(top + i * p.dilation[0]) * p.ld..];
        for j in 0..kw {
            let wv = p.w[i * kw + j];
            let src = &row[j * dw..];
            if sw == 1 {
                for (o, &v) in out.iter_mut().zip(src) {
                    *o = madd::<FMA>(wv, v, *o);
                }
            } else {
                for (o, &v) in out.iter_mut().zip(src.iter().step_by(sw)) {
                    *o = madd::<FMA>(wv, v, *o);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Conv
// ---------------------------------------------------------------------------------------------

pub(crate) fn conv(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    conv_act(ctx, inputs, Act::None)
}

/// Conv followed by `act` (FusedConv), fused into the f32 kernels; other dtypes take no activation.
pub(crate) fn conv_act(ctx: &OpCtx, inputs: &[Option<Tensor>], act: Act) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let w = ctx.input(inputs, 1)?;
    let b = ctx.opt_input(inputs, 2);
    let s = conv_shape(ctx, x, w)?;
    if act != Act::None && x.dtype() != DType::F32 {
        return Err(Error::DType(format!("FusedConv activation on {} output", x.dtype())));
    }
    let y = match x.dtype() {
        DType::F32 => conv_f32_tensor(&s, x, w, b, act)?,
        DType::F64 => typed::<f64>(&s, x, w, b)?,
        DType::F16 | DType::BF16 => {
            let mut y = vec![0f32; s.out_shape.iter().product()];
            let bv = b.map(widen).transpose()?;
            conv_core(&s, &widen(x)?, &widen(w)?, bv.as_deref(), &mut y)?;
            narrow(x.dtype(), &s.out_shape, &y)?
        }
        d => return Err(Error::DType(format!("Conv does not support {d}"))),
    };
    Ok(vec![y])
}

/// A float conv written straight into the output tensor.
fn typed<T: MatElem>(s: &ConvShape, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut y = Tensor::zeros(x.dtype(), &s.out_shape);
    let bias = b.map(|b| b.view::<T>()).transpose()?;
    if let Some(bv) = bias {
        if bv.len() != s.m {
            return Err(Error::Shape(format!("Conv: bias has {} elements, expected {}", bv.len(), s.m)));
        }
    }
    conv_core(s, x.view::<T>()?, w.view::<T>()?, bias, y.view_mut::<T>()?)?;
    Ok(y)
}

fn widen(t: &Tensor) -> Result<Vec<f32>> {
    Ok(match t.dtype() {
        DType::F16 => t.view::<f16>()?.iter().map(|x| x.to_f32()).collect(),
        DType::BF16 => t.view::<bf16>()?.iter().map(|x| x.to_f32()).collect(),
        DType::F32 => t.view::<f32>()?.to_vec(),
        d => return Err(Error::DType(format!("expected a float tensor, got {d}"))),
    })
}

fn narrow(dtype: DType, shape: &[usize], v: &[f32]) -> Result<Tensor> {
    match dtype {
        DType::F16 => Tensor::from_vec(shape, v.iter().map(|&x| f16::from_f32(x)).collect()),
        DType::BF16 => Tensor::from_vec(shape, v.iter().map(|&x| bf16::from_f32(x)).collect()),
        _ => Tensor::from_slice_as(DType::F32, shape, v),
    }
}

// ---------------------------------------------------------------------------------------------
// ConvInteger, QLinearConv
// ---------------------------------------------------------------------------------------------

/// 8-bit (or 4-bit) integers widened to i32, minus a zero point per tensor or per `block`-sized
/// run (per output channel of W).
fn centered(t: &Tensor, zp: Option<&Tensor>, block: usize) -> Result<Vec<i32>> {
    let mut v: Vec<i32> = match t.dtype() {
        DType::U8 | DType::U4 => t.view::<u8>()?.iter().map(|&x| x as i32).collect(),
        DType::I8 | DType::I4 => t.view::<i8>()?.iter().map(|&x| x as i32).collect(),
        d => return Err(Error::DType(format!("expected an 8-bit integer tensor, got {d}"))),
    };
    if let Some(zp) = zp {
        let z: Vec<i32> = zp.to_i64_vec()?.into_iter().map(|x| x as i32).collect();
        if z.len() == 1 {
            v.iter_mut().for_each(|x| *x -= z[0]);
        } else if block > 0 && z.len() * block == v.len() {
            for (chunk, &zz) in v.chunks_mut(block).zip(&z) {
                chunk.iter_mut().for_each(|x| *x -= zz);
            }
        } else {
            return Err(Error::Shape(format!("zero point of {} elements does not fit {:?}", z.len(), t.shape())));
        }
    }
    Ok(v)
}

/// The exact i32 convolution of zero-point-adjusted integer operands (plus an optional i32 bias).
fn int_conv(ctx: &OpCtx, x: &Tensor, xz: Option<&Tensor>, w: &Tensor, wz: Option<&Tensor>, bias: Option<&Tensor>) -> Result<(ConvShape, Vec<i32>)> {
    let s = conv_shape(ctx, x, w)?;
    let xv = centered(x, xz, 0)?;
    let wv = centered(w, wz, w.len() / s.m.max(1))?;
    let bv = bias.map(|b| b.view::<i32>().map(|v| v.to_vec())).transpose()?;
    if bv.as_ref().is_some_and(|b| b.len() != s.m) {
        return Err(Error::Shape("bias does not have one element per output channel".into()));
    }
    let mut y = vec![0i32; s.out_shape.iter().product()];
    conv_core(&s, &xv, &wv, bv.as_deref(), &mut y)?;
    Ok((s, y))
}

fn conv_integer(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let w = ctx.input(inputs, 1)?;
    let (s, y) = int_conv(ctx, x, ctx.opt_input(inputs, 2), w, ctx.opt_input(inputs, 3), None)?;
    Ok(vec![Tensor::from_vec(&s.out_shape, y)?])
}

fn qlinear_conv(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let xs = ctx.input(inputs, 1)?.to_f64_vec()?;
    let xz = ctx.opt_input(inputs, 2);
    let w = ctx.input(inputs, 3)?;
    let ws = ctx.input(inputs, 4)?.to_f64_vec()?;
    let wz = ctx.opt_input(inputs, 5);
    let ys = ctx.input(inputs, 6)?.to_f64_vec()?;
    let yz = ctx.opt_input(inputs, 7);
    let bias = ctx.opt_input(inputs, 8);
    let (s, acc) = int_conv(ctx, x, xz, w, wz, bias)?;
    if xs.len() != 1 || ys.len() != 1 || (ws.len() != 1 && ws.len() != s.m) {
        return Err(ctx.unsupported("x_scale and y_scale must be scalars, w_scale scalar or per output channel"));
    }
    let out_dtype = yz.map_or(x.dtype(), |z| z.dtype());
    let (lo, hi) = quant_range(out_dtype)?;
    let zy = match yz {
        Some(z) => *z.to_i64_vec()?.first().ok_or_else(|| Error::Shape("empty y_zero_point".into()))? as i32,
        None => 0,
    };
    let mults: Vec<f64> = (0..s.m)
        .map(|m| requant_multiplier(xs[0] as f32, ws[if ws.len() == 1 { 0 } else { m }] as f32, ys[0] as f32, false))
        .collect();
    let outsz = s.geo.out_size().max(1);
    let y: Vec<i32> = acc
        .iter()
        .enumerate()
        .map(|(i, &v)| requantize(v as f64 * mults[(i / outsz) % s.m], zy, lo, hi))
        .collect();
    Ok(vec![quant_tensor(out_dtype, &s.out_shape, &y)?])
}

// ---------------------------------------------------------------------------------------------
// ConvTranspose
// ---------------------------------------------------------------------------------------------

/// Geometry of a transposed convolution: `geo` describes the *forward* conv from the output
/// (as its input) to X (as its output), which is exactly the scatter pattern of col2im.
fn conv_transpose_shape(ctx: &OpCtx, x: &Tensor, w: &Tensor) -> Result<ConvShape> {
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(Error::Shape(format!("ConvTranspose: X {:?} and W {:?} need equal rank >= 3", x.shape(), w.shape())));
    }
    let nd = x.rank() - 2;
    let group = ctx.attr_i("group", 1);
    let (n, c) = (x.shape()[0], x.shape()[1]);
    if group <= 0 || c % group as usize != 0 || w.shape()[0] != c {
        return Err(Error::Shape(format!("ConvTranspose: X {:?}, W {:?}, group {group} disagree", x.shape(), w.shape())));
    }
    let group = group as usize;
    let m = w.shape()[1] * group;
    let k = kernel_dims(ctx, w)?;
    let ints = |name: &str, default: i64, len: usize| -> Result<Vec<i64>> {
        let v = ctx.attr_ints(name).unwrap_or_else(|| vec![default; len]);
        if v.len() != len {
            return Err(Error::Shape(format!("attribute {name} = {v:?} does not fit {nd} spatial dims")));
        }
        Ok(v)
    };
    let strides = ints("strides", 1, nd)?;
    let dil = ints("dilations", 1, nd)?;
    let out_pad = ints("output_padding", 0, nd)?;
    let auto_pad = ctx.attr_s("auto_pad", "NOTSET");
    let out_shape_attr = ctx.attr_ints("output_shape").map(|v| v[v.len().saturating_sub(nd)..].to_vec());
    let explicit_pads = ctx.attr_ints("pads");
    let mut dims = Vec::with_capacity(nd);
    for i in 0..nd {
        let inp = x.shape()[2 + i] as i64;
        let (s, d, kk) = (strides[i], dil[i], k[i] as i64);
        if s <= 0 || d <= 0 {
            return Err(Error::Shape("strides and dilations must be positive".into()));
        }
        let ek = (kk - 1) * d + 1;
        let full = s * (inp - 1) + out_pad[i] + ek;
        let (pb, out) = if let Some(os) = &out_shape_attr {
            let total = full - os[i];
            let pb = if total <= 0 {
                0
            } else if auto_pad == "SAME_UPPER" {
                total / 2
            } else {
                total - total / 2
            };
            (pb, os[i])
        } else if auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER" {
            let out = inp * s;
            let total = (full - out).max(0);
            let pb = if auto_pad == "SAME_UPPER" { total / 2 } else { total - total / 2 };
            (pb, out)
        } else {
            let p = explicit_pads.clone().unwrap_or_else(|| vec![0; 2 * nd]);
            if p.len() != 2 * nd {
                return Err(Error::Shape(format!("pads {p:?} do not fit {nd} spatial dims")));
            }
            (p[i], full - p[i] - p[i + nd])
        };
        if out < 0 || pb < 0 {
            return Err(Error::Shape(format!("ConvTranspose: negative output size or padding in dim {i}")));
        }
        // Seen from the output: a forward conv producing X's spatial dims.
        dims.push(DimGeom {
            input: out as usize,
            output: inp as usize,
            kernel: kk as usize,
            stride: s as usize,
            dilation: d as usize,
            pad_begin: pb as usize,
            pad_end: 0,
        });
    }
    let mut out_shape = vec![n, m];
    out_shape.extend(dims.iter().map(|d| d.input));
    Ok(ConvShape { n, c, m, group, geo: Geo3::new(&dims)?, out_shape })
}

fn conv_transpose(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let w = ctx.input(inputs, 1)?;
    let b = ctx.opt_input(inputs, 2);
    let s = conv_transpose_shape(ctx, x, w)?;
    let total: usize = s.out_shape.iter().product();
    let y = match x.dtype() {
        DType::F32 | DType::F64 => crate::with_real!(x.dtype(), T, {
            // Unfilled: the core sets every element to the bias (or zero) before accumulating.
            let bv = b.map(|b| b.view::<T>()).transpose()?;
            let (xv, wv) = (x.view::<T>()?, w.view::<T>()?);
            Tensor::filled_by::<T>(x.dtype(), &s.out_shape, |y| conv_transpose_core(&s, xv, wv, bv, y))?
        }),
        DType::F16 | DType::BF16 => {
            let mut y = vec![0f32; total];
            let bv = b.map(widen).transpose()?;
            conv_transpose_core(&s, &widen(x)?, &widen(w)?, bv.as_deref(), &mut y)?;
            narrow(x.dtype(), &s.out_shape, &y)?
        }
        d => return Err(Error::DType(format!("ConvTranspose does not support {d}"))),
    };
    Ok(vec![y])
}

/// Per (image, group): col = W_gᵀ · X_g, then scatter-add col into the output (col2im).
fn conv_transpose_core<T: MatElem>(s: &ConvShape, x: &[T], w: &[T], bias: Option<&[T]>, y: &mut [T]) -> Result<()> {
    let g = &s.geo;
    // In `geo`, "input" is the ConvTranspose output and "output" is X.
    let (xsz, ysz, ksz) = (g.out_size(), g.in_size(), g.k_size());
    let (cpg, mpg) = (s.c / s.group, s.m / s.group);
    if x.len() != s.n * s.c * xsz || w.len() != s.c * mpg * ksz || y.len() != s.n * s.m * ysz {
        return Err(Error::Shape("ConvTranspose: buffer sizes do not match the shapes".into()));
    }
    if let Some(b) = bias {
        if b.len() != s.m {
            return Err(Error::Shape("ConvTranspose: bias does not have one element per output channel".into()));
        }
    }
    // Kernel = stride, no dilation or padding (the 2×2 / stride 2 upsampling of U-Nets and
    // PP-OCR det): every output element gets exactly one product, so it is written once from the
    // columns instead of filled with the bias and then accumulated into.
    let tiles = (0..3).all(|i| {
        g.kernel[i] == g.stride[i] && (g.dilation[i] == 1 || g.kernel[i] == 1) && g.pad[i] == 0 && g.input[i] == g.output[i] * g.stride[i]
    });
    if !tiles || ysz == 0 || xsz == 0 {
        for (i, plane) in y.chunks_mut(ysz.max(1)).enumerate() {
            plane.fill(bias.map_or(T::ZERO, |b| b[i % s.m]));
        }
    }
    if ysz == 0 || xsz == 0 {
        return Ok(());
    }
    let rows = mpg * ksz;
    // Scratch from the buffer pool, unfilled: the GEMM overwrites it (a zeroed Vec of this size,
    // 10 MB in PP-OCR det, page-faulted on every call).
    let mut scratch = Tensor::filled_by::<T>(T::DTYPE, &[rows * xsz], |_| Ok(()))?;
    let col = scratch.view_mut::<T>()?;
    for b in 0..s.n {
        for grp in 0..s.group {
            let xg = &x[(b * s.c + grp * cpg) * xsz..][..cpg * xsz];
            let wg = &w[grp * cpg * rows..][..cpg * rows];
            gemm(rows, xsz, cpg, Mat::cols(wg, rows), Mat::rows(xg, xsz), false, col, xsz, true)?;
            let yg = &mut y[(b * s.m + grp * mpg) * ysz..][..mpg * ysz];
            crate::cpu::par::chunks_mut(yg, ysz, |m, yp| {
                let cm = &col[m * ksz * xsz..(m + 1) * ksz * xsz];
                if tiles {
                    place_tiles(g, cm, bias.map_or(T::ZERO, |b| b[grp * mpg + m]), yp);
                } else {
                    col2im(g, cm, yp);
                }
            });
        }
    }
    Ok(())
}

/// Write one output channel's plane from its columns ([k, X positions]) plus `bias` when the
/// kernel tiles the output (kernel = stride, no dilation, no padding): each element once.
fn place_tiles<T: MatElem>(g: &Geo3, col: &[T], bias: T, yp: &mut [T]) {
    let xsz = g.out_size();
    let (xh, xw) = (g.output[1], g.output[2]);
    let (yh, yw) = (g.input[1], g.input[2]);
    let (s0, s1, s2) = (g.stride[0], g.stride[1], g.stride[2]);
    for yd in 0..g.input[0] {
        for yr in 0..yh {
            let (id, kd, ih, kh) = (yd / s0, yd % s0, yr / s1, yr % s1);
            let row = &mut yp[(yd * yh + yr) * yw..][..yw];
            let pos = (id * xh + ih) * xw;
            for kw in 0..s2 {
                let kk = (kd * g.kernel[1] + kh) * g.kernel[2] + kw;
                let src = &col[kk * xsz + pos..][..xw];
                for (iw, &v) in src.iter().enumerate() {
                    row[iw * s2 + kw] = bias.add(v);
                }
            }
        }
    }
}

/// Scatter-add one output channel's columns ([k, X positions]) into its output plane.
fn col2im<T: MatElem>(g: &Geo3, col: &[T], yp: &mut [T]) {
    let xsz = g.out_size();
    let (xh, xw) = (g.output[1], g.output[2]);
    let (yh, yw) = (g.input[1], g.input[2]);
    for kd in 0..g.kernel[0] {
        let vd = g.valid(0, kd);
        for kh in 0..g.kernel[1] {
            let vh = g.valid(1, kh);
            for kw in 0..g.kernel[2] {
                let vw = g.valid(2, kw);
                if vw.0 >= vw.1 {
                    continue;
                }
                let kk = (kd * g.kernel[1] + kh) * g.kernel[2] + kw;
                let crow = &col[kk * xsz..(kk + 1) * xsz];
                let s2 = g.stride[2];
                for id in vd.0..vd.1 {
                    for ih in vh.0..vh.1 {
                        let src = &crow[(id * xh + ih) * xw..][..xw];
                        let base = (g.src(0, id, kd) * yh + g.src(1, ih, kh)) * yw;
                        let first = base + vw.0 * s2 + kw * g.dilation[2] - g.pad[2];
                        for (j, &v) in src[vw.0..vw.1].iter().enumerate() {
                            let o = &mut yp[first + j * s2];
                            *o = o.add(v);
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DeformConv (2-D)
// ---------------------------------------------------------------------------------------------

fn deform_conv(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let w = ctx.input(inputs, 1)?;
    if x.rank() != 4 {
        return Err(ctx.unsupported("only 2-D deformable convolution is implemented"));
    }
    let s = conv_shape(ctx, x, w)?;
    let offset = ctx.input(inputs, 2)?;
    let og = ctx.attr_i("offset_group", 1).max(1) as usize;
    let ksz = s.geo.k_size();
    let (oh, ow) = (s.geo.output[1], s.geo.output[2]);
    if s.c % og != 0 || offset.shape() != [s.n, og * ksz * 2, oh, ow] {
        return Err(Error::Shape(format!("DeformConv: offset {:?} does not fit the geometry", offset.shape())));
    }
    let mask = ctx.opt_input(inputs, 4);
    if mask.is_some_and(|m| m.shape() != [s.n, og * ksz, oh, ow]) {
        return Err(Error::Shape("DeformConv: mask does not fit the geometry".into()));
    }
    crate::with_real!(x.dtype(), R, {
        let xv = crate::cpu::util::real_vec::<R>(x)?;
        let wv = crate::cpu::util::real_vec::<R>(w)?;
        let ov = crate::cpu::util::real_vec::<R>(offset)?;
        let mv = mask.map(crate::cpu::util::real_vec::<R>).transpose()?;
        let bv = ctx.opt_input(inputs, 3).map(crate::cpu::util::real_vec::<R>).transpose()?;
        let mut y = vec![<R as MatElem>::ZERO; s.out_shape.iter().product()];
        let d = DeformArgs { s: &s, og, offset: &ov, mask: mv.as_deref() };
        d.run(&xv, &wv, bv.as_deref(), &mut y)?;
        Ok(vec![crate::cpu::util::real_tensor(x.dtype(), &s.out_shape, y)?])
    })
}

struct DeformArgs<'a, R> {
    s: &'a ConvShape,
    og: usize,
    offset: &'a [R],
    mask: Option<&'a [R]>,
}

impl<R: crate::cpu::util::Real + MatElem> DeformArgs<'_, R> {
    /// Bilinearly sampled columns per (image, group), then the same GEMM as Conv.
    fn run(&self, x: &[R], w: &[R], bias: Option<&[R]>, y: &mut [R]) -> Result<()> {
        let s = self.s;
        let g = &s.geo;
        let (ih, iw) = (g.input[1], g.input[2]);
        let (oh, ow) = (g.output[1], g.output[2]);
        let (insz, outsz, ksz) = (ih * iw, oh * ow, g.k_size());
        let (cpg, mpg) = (s.c / s.group, s.m / s.group);
        let cpo = s.c / self.og;
        if bias.is_some_and(|b| b.len() != s.m) {
            return Err(Error::Shape("DeformConv: bias does not have one element per output channel".into()));
        }
        for (i, plane) in y.chunks_mut(outsz.max(1)).enumerate() {
            plane.fill(bias.map_or(<R as MatElem>::ZERO, |b| b[i % s.m]));
        }
        let kdim = cpg * ksz;
        let mut col = vec![<R as MatElem>::ZERO; kdim * outsz];
        for b in 0..s.n {
            for grp in 0..s.group {
                crate::cpu::par::chunks_mut(&mut col, outsz, |r, crow| {
                    let (ci, kk) = (r / ksz, r % ksz);
                    let c = grp * cpg + ci;
                    let o = c / cpo;
                    let (kh, kw) = (kk / g.kernel[2], kk % g.kernel[2]);
                    let plane = &x[(b * s.c + c) * insz..][..insz];
                    let off_h = &self.offset[((b * self.og + o) * ksz + kk) * 2 * outsz..][..outsz];
                    let off_w = &self.offset[(((b * self.og + o) * ksz + kk) * 2 + 1) * outsz..][..outsz];
                    let mask = self.mask.map(|m| &m[((b * self.og + o) * ksz + kk) * outsz..][..outsz]);
                    for (p, v) in crow.iter_mut().enumerate() {
                        let (i, j) = (p / ow, p % ow);
                        let h = (i * g.stride[1] + kh * g.dilation[1]) as f64 - g.pad[1] as f64 + off_h[p].to_f64();
                        let ww = (j * g.stride[2] + kw * g.dilation[2]) as f64 - g.pad[2] as f64 + off_w[p].to_f64();
                        let val = bilinear(plane, ih, iw, h, ww);
                        let m = mask.map_or(1.0, |m| m[p].to_f64());
                        *v = R::from_f64(val * m);
                    }
                });
                let wg = &w[grp * mpg * kdim..][..mpg * kdim];
                let yg = &mut y[(b * s.m + grp * mpg) * outsz..][..mpg * outsz];
                gemm(mpg, outsz, kdim, Mat::rows(wg, kdim), Mat::rows(&col, outsz), true, yg, outsz, true)?;
            }
        }
        Ok(())
    }
}

/// Bilinear sample of a plane at (h, w); neighbours outside the plane count as zero.
fn bilinear<R: crate::cpu::util::Real>(plane: &[R], ih: usize, iw: usize, h: f64, w: f64) -> f64 {
    let (h0, w0) = (h.floor(), w.floor());
    let (dh, dw) = (h - h0, w - w0);
    let at = |y: f64, x: f64| -> f64 {
        if y < 0.0 || x < 0.0 || y >= ih as f64 || x >= iw as f64 {
            0.0
        } else {
            plane[y as usize * iw + x as usize].to_f64()
        }
    };
    at(h0, w0) * (1.0 - dh) * (1.0 - dw)
        + at(h0, w0 + 1.0) * (1.0 - dh) * dw
        + at(h0 + 1.0, w0) * dh * (1.0 - dw)
        + at(h0 + 1.0, w0 + 1.0) * dh * dw
}

// ---------------------------------------------------------------------------------------------
// CausalConvWithState (opset 27)
// ---------------------------------------------------------------------------------------------

/// Causal depthwise 1-D convolution over `[past_state | input]`, with an optional fused SiLU;
/// also returns the last k-1 positions as the next state.
fn causal_conv_with_state(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let w = ctx.input(inputs, 1)?;
    if x.rank() != 3 || w.rank() != 3 || w.shape()[0] != x.shape()[1] || w.shape()[1] != 1 || w.shape()[2] == 0 {
        return Err(Error::Shape(format!("CausalConvWithState: input {:?} / weight {:?}", x.shape(), w.shape())));
    }
    let (b, c, l) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let k = w.shape()[2];
    let silu = match ctx.attr_s("activation", "none").as_str() {
        "none" => false,
        "silu" | "swish" => true,
        a => return Err(ctx.unsupported(format!("activation '{a}'"))),
    };
    let past = ctx.opt_input(inputs, 3);
    if past.is_some_and(|p| p.shape() != [b, c, k - 1]) {
        return Err(Error::Shape("CausalConvWithState: past_state must be [batch, channels, k - 1]".into()));
    }
    let dtype = x.dtype();
    crate::with_real!(x.dtype(), R, {
        use crate::cpu::util::{real_tensor, real_vec, Real};
        let xv = real_vec::<R>(x)?;
        let wv = real_vec::<R>(w)?;
        let bv = ctx.opt_input(inputs, 2).map(real_vec::<R>).transpose()?;
        if bv.as_ref().is_some_and(|v| v.len() != c) {
            return Err(Error::Shape("CausalConvWithState: bias must have one element per channel".into()));
        }
        let pv = past.map(real_vec::<R>).transpose()?;
        let plen = l + k - 1;
        let mut y = vec![<R as Real>::ZERO; b * c * l];
        // One state row per (batch, channel) even when k = 1 leaves it empty, so the zip below
        // still visits every row.
        let srow = (k - 1).max(1);
        let mut state = vec![<R as Real>::ZERO; b * c * srow];
        crate::cpu::par::chunks_mut2(&mut y, l, &mut state, srow, |p, yr, sr| {
            let ch = p % c;
            let mut padded = vec![<R as Real>::ZERO; plen];
            if let Some(pv) = &pv {
                padded[..k - 1].copy_from_slice(&pv[p * (k - 1)..(p + 1) * (k - 1)]);
            }
            padded[k - 1..].copy_from_slice(&xv[p * l..(p + 1) * l]);
            let wk = &wv[ch * k..(ch + 1) * k];
            let b0 = bv.as_ref().map_or(<R as Real>::ZERO, |b| b[ch]);
            for (t, o) in yr.iter_mut().enumerate() {
                let mut acc = b0;
                for (j, &wj) in wk.iter().enumerate() {
                    acc += wj * padded[t + j];
                }
                // The reference rounds the convolution to the input type before activating.
                if dtype == DType::F16 {
                    acc = R::from_f64(f16::from_f64(acc.to_f64()).to_f64());
                } else if dtype == DType::BF16 {
                    acc = R::from_f64(bf16::from_f64(acc.to_f64()).to_f64());
                }
                *o = if silu { acc / (R::ONE + (-acc).exp()) } else { acc };
            }
            if k > 1 {
                sr.copy_from_slice(&padded[plen - (k - 1)..]);
            }
        });
        state.truncate(b * c * (k - 1));
        Ok(vec![real_tensor(x.dtype(), x.shape(), y)?, real_tensor(x.dtype(), &[b, c, k - 1], state)?])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    fn ints(name: &str, v: &[i64]) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Ints as i32, ints: v.to_vec(), ..Default::default() }
    }

    fn run(op: &str, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Tensor {
        let step = Step { op: op.into(), opset: 17, outputs: vec![0], attrs, ..Default::default() };
        crate::cpu::eval_step(&step, &inputs).unwrap().remove(0)
    }

    fn t(v: Vec<f32>, shape: &[usize]) -> Option<Tensor> {
        Some(Tensor::from_vec(shape, v).unwrap())
    }

    #[test]
    fn conv_padded_3x3_and_bias() {
        // 3x3 input of ones, 3x3 kernel of ones, pad 1: counts of in-bounds taps, plus bias 1.
        let y = run(
            "Conv",
            vec![ints("pads", &[1, 1, 1, 1])],
            vec![t(vec![1.; 9], &[1, 1, 3, 3]), t(vec![1.; 9], &[1, 1, 3, 3]), t(vec![1.], &[1])],
        );
        assert_eq!(y.view::<f32>().unwrap(), &[5., 7., 5., 7., 10., 7., 5., 7., 5.]);
    }

    #[test]
    fn depthwise_matches_grouped_reference() {
        // Two channels, group 2, stride 2: each channel scaled by its own 1x1 kernel.
        let a = Attr { name: "group".into(), kind: AttrKind::Int as i32, i: 2, ..Default::default() };
        let y = run(
            "Conv",
            vec![a, ints("strides", &[2, 2])],
            vec![t((0..8).map(|v| v as f32).collect(), &[1, 2, 2, 2]), t(vec![2., 3.], &[2, 1, 1, 1]), None],
        );
        assert_eq!(y.shape(), &[1, 2, 1, 1]);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 12.]);
    }

    #[test]
    fn conv_transpose_stride2() {
        // 1-D: x = [1, 2], w = [1, 1, 1], stride 2 -> [1, 1, 3, 2, 2].
        let y = run(
            "ConvTranspose",
            vec![ints("strides", &[2])],
            vec![t(vec![1., 2.], &[1, 1, 2]), t(vec![1., 1., 1.], &[1, 1, 3]), None],
        );
        assert_eq!(y.view::<f32>().unwrap(), &[1., 1., 3., 2., 2.]);
    }

    /// ConvTranspose 2-D against its definition: kernels that tile the output (kernel = stride,
    /// written once per element) and ones that overlap or are padded (accumulated), with groups.
    #[test]
    fn conv_transpose_2d_matches_definition() {
        let cases: [([usize; 2], [usize; 2], [usize; 4], usize); 4] =
            [([2, 2], [2, 2], [0; 4], 1), ([3, 2], [3, 2], [0; 4], 2), ([2, 2], [2, 2], [1, 0, 0, 1], 1), ([3, 3], [2, 2], [1, 1, 1, 1], 2)];
        for (ci, &(k, st, pads, group)) in cases.iter().enumerate() {
            let (c, mg, h, w) = (4usize, 3usize, 3usize, 5usize);
            let m = mg * group;
            let mut r = lcg(ci as u64 + 40);
            let x: Vec<f32> = (0..c * h * w).map(|_| r()).collect();
            let wt: Vec<f32> = (0..c * mg * k[0] * k[1]).map(|_| r()).collect();
            let b: Vec<f32> = (0..m).map(|_| r()).collect();
            let (oh, ow) = (st[0] * (h - 1) + k[0] - pads[0] - pads[2], st[1] * (w - 1) + k[1] - pads[1] - pads[3]);
            let mut want: Vec<f64> = (0..m * oh * ow).map(|i| b[i / (oh * ow)] as f64).collect();
            let cg = c / group;
            for ch in 0..c {
                for j in 0..mg {
                    let oc = (ch / cg) * mg + j;
                    for iy in 0..h {
                        for ix in 0..w {
                            for ky in 0..k[0] {
                                for kx in 0..k[1] {
                                    let (y, xx) = ((iy * st[0] + ky) as isize - pads[0] as isize, (ix * st[1] + kx) as isize - pads[1] as isize);
                                    if y >= 0 && xx >= 0 && (y as usize) < oh && (xx as usize) < ow {
                                        want[(oc * oh + y as usize) * ow + xx as usize] +=
                                            x[(ch * h + iy) * w + ix] as f64 * wt[((ch * mg + j) * k[0] + ky) * k[1] + kx] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let g = Attr { name: "group".into(), kind: AttrKind::Int as i32, i: group as i64, ..Default::default() };
            let attrs = vec![g, ints("strides", &[st[0] as i64, st[1] as i64]), ints("pads", &pads.map(|p| p as i64))];
            let y = run("ConvTranspose", attrs, vec![t(x, &[1, c, h, w]), t(wt, &[c, mg, k[0], k[1]]), t(b, &[m])]);
            assert_eq!(y.shape(), &[1, m, oh, ow], "case {ci}");
            for (i, (&got, &want)) in y.view::<f32>().unwrap().iter().zip(&want).enumerate() {
                assert!((got as f64 - want).abs() < 1e-4, "case {ci} element {i}: {got} vs {want}");
            }
        }
    }

    // ---- f32 conv against a scalar reference ----

    use crate::cpu::gemm::act_scalar;
    use proptest::prelude::*;

    /// A conv problem: shapes and attributes (per spatial dim).
    #[derive(Clone, Debug)]
    struct Case {
        n: usize,
        c: usize,
        m: usize,
        group: usize,
        input: Vec<usize>,
        kernel: Vec<usize>,
        strides: Vec<usize>,
        dil: Vec<usize>,
        pads: Vec<usize>,
        bias: bool,
        act: Act,
    }

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    impl Case {
        fn nd(&self) -> usize {
            self.input.len()
        }

        fn out_dims(&self) -> Vec<usize> {
            (0..self.nd())
                .map(|i| {
                    let ek = (self.kernel[i] - 1) * self.dil[i] + 1;
                    let padded = self.input[i] + self.pads[i] + self.pads[i + self.nd()];
                    if padded < ek { 0 } else { (padded - ek) / self.strides[i] + 1 }
                })
                .collect()
        }

        fn tensors(&self, seed: u64) -> (Tensor, Tensor, Option<Tensor>) {
            let mut r = lcg(seed);
            let mut xs = vec![self.n, self.c];
            xs.extend(&self.input);
            let mut ws = vec![self.m, self.c / self.group];
            ws.extend(&self.kernel);
            let x: Vec<f32> = (0..xs.iter().product::<usize>()).map(|_| r()).collect();
            let w: Vec<f32> = (0..ws.iter().product::<usize>()).map(|_| r()).collect();
            let b = self.bias.then(|| Tensor::from_vec(&[self.m], (0..self.m).map(|_| r()).collect()).unwrap());
            (Tensor::from_vec(&xs, x).unwrap(), Tensor::from_vec(&ws, w).unwrap(), b)
        }

        fn attrs(&self) -> Vec<Attr> {
            let v = |x: &[usize]| x.iter().map(|&v| v as i64).collect::<Vec<_>>();
            vec![
                ints("strides", &v(&self.strides)),
                ints("dilations", &v(&self.dil)),
                ints("pads", &v(&self.pads)),
                Attr { name: "group".into(), kind: AttrKind::Int as i32, i: self.group as i64, ..Default::default() },
            ]
        }

        /// The convolution by its definition, accumulated in f64.
        fn reference(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Vec<f32> {
            let (x, w) = (x.view::<f32>().unwrap(), w.view::<f32>().unwrap());
            let b = b.map(|b| b.view::<f32>().unwrap());
            let nd = self.nd();
            let out = self.out_dims();
            let (osz, isz, ksz) = (out.iter().product::<usize>(), self.input.iter().product::<usize>(), self.kernel.iter().product::<usize>());
            let (cpg, mpg) = (self.c / self.group, self.m / self.group);
            let mut y = vec![0f32; self.n * self.m * osz];
            for bi in 0..self.n {
                for m in 0..self.m {
                    let grp = m / mpg;
                    for o in 0..osz {
                        let mut acc = b.map_or(0.0, |b| b[m] as f64);
                        for ci in 0..cpg {
                            let c = grp * cpg + ci;
                            'taps: for kk in 0..ksz {
                                let (mut orem, mut krem, mut xi) = (o, kk, 0usize);
                                let mut ostr = osz;
                                let mut kstr = ksz;
                                for d in 0..nd {
                                    ostr /= out[d];
                                    kstr /= self.kernel[d];
                                    let (od, kd) = (orem / ostr, krem / kstr);
                                    orem %= ostr;
                                    krem %= kstr;
                                    let pos = (od * self.strides[d] + kd * self.dil[d]) as isize - self.pads[d] as isize;
                                    if pos < 0 || pos >= self.input[d] as isize {
                                        continue 'taps;
                                    }
                                    xi = xi * self.input[d] + pos as usize;
                                }
                                acc += x[(bi * self.c + c) * isz + xi] as f64 * w[(m * cpg + ci) * ksz + kk] as f64;
                            }
                        }
                        y[(bi * self.m + m) * osz + o] = act_scalar(acc as f32, self.act);
                    }
                }
            }
            y
        }

        fn check(&self, seed: u64) {
            let (x, w, b) = self.tensors(seed);
            let want = self.reference(&x, &w, b.as_ref());
            let mut attrs = self.attrs();
            let inputs = vec![Some(x), Some(w), b];
            let got = if self.act == Act::None {
                run("Conv", attrs, inputs)
            } else {
                attrs.extend(act_attrs(self.act));
                let step = Step { op: "FusedConv".into(), domain: "kiln".into(), opset: 1, outputs: vec![0], attrs, ..Default::default() };
                crate::cpu::eval_step(&step, &inputs).unwrap().remove(0)
            };
            let mut shape = vec![self.n, self.m];
            shape.extend(self.out_dims());
            assert_eq!(got.shape(), &shape[..], "{self:?}");
            for (i, (&g, &r)) in got.view::<f32>().unwrap().iter().zip(&want).enumerate() {
                assert!((g - r).abs() <= 1e-5 + 1e-4 * r.abs(), "{self:?}: element {i}: got {g}, want {r}");
            }
        }
    }

    fn act_attrs(act: Act) -> Vec<Attr> {
        let (name, params) = match act {
            Act::Relu => ("Relu", vec![]),
            Act::Clip(a, b) => ("Clip", vec![a, b]),
            Act::LeakyRelu(a) => ("LeakyRelu", vec![a]),
            Act::Sigmoid => ("Sigmoid", vec![]),
            Act::HardSigmoid(a, b) => ("HardSigmoid", vec![a, b]),
            Act::HardSwish => ("HardSwish", vec![]),
            _ => ("Tanh", vec![]),
        };
        vec![
            Attr { name: "activation".into(), kind: AttrKind::String as i32, s: name.as_bytes().to_vec(), ..Default::default() },
            Attr { name: "activation_params".into(), kind: AttrKind::Floats as i32, floats: params, ..Default::default() },
        ]
    }

    const ACTS: [Act; 7] =
        [Act::None, Act::Relu, Act::Clip(-0.5, 0.5), Act::LeakyRelu(0.1), Act::HardSigmoid(0.2, 0.5), Act::HardSwish, Act::Sigmoid];

    fn case_strategy(max_w: usize) -> impl Strategy<Value = Case> {
        (1usize..=2, 1usize..=3, 1usize..=4, 1usize..=4, 1usize..=2, any::<bool>(), 0usize..ACTS.len(), 0u32..4)
            .prop_flat_map(move |(n, group, cpg, mpg, nd, bias, act, kind)| {
                let dims = prop::collection::vec((1usize..=max_w, 1usize..=5, 1usize..=3, 1usize..=2, 0usize..=2, 0usize..=2), nd);
                (Just((n, group, cpg, mpg, bias, act, kind)), dims)
            })
            .prop_map(|((n, group, cpg, mpg, bias, act, kind), dims)| {
                // kind 0: depthwise (cpg 1, group = C), kind 1: 1x1 pointwise, else anything.
                let (group, cpg) = if kind == 0 { (group + 1, 1) } else { (group, cpg) };
                let nd = dims.len();
                let mut c = Case {
                    n,
                    c: cpg * group,
                    m: mpg * group,
                    group,
                    input: dims.iter().map(|d| d.0).collect(),
                    kernel: dims.iter().map(|d| if kind == 1 { 1 } else { d.1 }).collect(),
                    strides: dims.iter().map(|d| if kind == 1 { 1 } else { d.2 }).collect(),
                    dil: dims.iter().map(|d| d.3).collect(),
                    pads: vec![0; 2 * nd],
                    bias,
                    act: ACTS[act],
                };
                if kind != 1 {
                    for (i, d) in dims.iter().enumerate() {
                        c.pads[i] = d.4;
                        c.pads[i + nd] = d.5;
                    }
                }
                c
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn conv_f32_matches_reference(c in case_strategy(9), seed in any::<u64>()) {
            c.check(seed);
        }

        #[test]
        fn conv_f32_wide_rows_match_reference(c in case_strategy(40), seed in any::<u64>()) {
            c.check(seed);
        }
    }

    fn case2d(c: usize, m: usize, group: usize, hw: [usize; 2], k: usize, s: [usize; 2], pad: usize) -> Case {
        Case {
            n: 1,
            c,
            m,
            group,
            input: hw.to_vec(),
            kernel: vec![k, k],
            strides: s.to_vec(),
            dil: vec![1, 1],
            pads: vec![pad; 4],
            bias: true,
            act: Act::HardSwish,
        }
    }

    #[test]
    fn depthwise_fast_paths_and_large_planes() {
        // 3x3 / 5x5 with column stride 1 and 2 (the register-blocked rows), widths with tails,
        // planes large enough to run in parallel, and a channel multiplier of 2.
        for (k, s) in [(3, [1, 1]), (3, [2, 2]), (5, [1, 1]), (5, [2, 1]), (3, [1, 2]), (4, [1, 1])] {
            case2d(8, 8, 8, [21, 37], k, s, k / 2).check(k as u64);
            case2d(4, 4, 4, [70, 90], k, s, k / 2).check(7);
        }
        case2d(3, 6, 3, [9, 35], 3, [1, 1], 1).check(3);
        let mut c = case2d(5, 5, 5, [6, 40], 3, [1, 1], 0);
        c.dil = vec![2, 3];
        c.check(11);
    }

    #[test]
    fn gemm_conv_large_and_parallel() {
        // Big enough for parallel tiles (and a split over output channels), 1x1 and 3x3.
        case2d(16, 24, 1, [40, 44], 3, [1, 1], 1).check(1);
        case2d(64, 96, 1, [4, 7], 3, [1, 1], 1).check(2);
        case2d(64, 80, 1, [30, 30], 1, [1, 1], 0).check(3);
        case2d(12, 8, 2, [33, 31], 3, [2, 2], 1).check(4);
        case2d(3, 16, 1, [64, 64], 3, [2, 2], 1).check(5);
        case2d(256, 64, 1, [12, 12], 3, [1, 1], 1).check(6);
    }

    /// The 1-D / 2-D depthwise kernels of every ISA this CPU runs (NEON on aarch64, whatever
    /// `KILN_ISA` says) against the definition.
    fn depthwise_every_isa(c: &Case, seed: u64) {
        let (x, w, b) = c.tensors(seed);
        let step = Step { op: "Conv".into(), opset: 17, attrs: c.attrs(), ..Default::default() };
        let ctx = OpCtx::new(&step, None);
        let s = conv_shape(&ctx, &x, &w).unwrap();
        let want = c.reference(&x, &w, b.as_ref());
        for isa in crate::cpu::isa::available() {
            let mut y = vec![f32::NAN; want.len()];
            let bv = b.as_ref().map(|b| b.view::<f32>().unwrap());
            depthwise_2d_f32(isa, &s, x.view().unwrap(), w.view().unwrap(), bv, c.act, &mut y);
            for (i, (&g, &r)) in y.iter().zip(&want).enumerate() {
                assert!((g - r).abs() <= 1e-5 + 1e-4 * r.abs(), "{isa} {c:?}: element {i}: got {g}, want {r}");
            }
        }
    }

    #[test]
    fn depthwise_every_isa_matches_scalar() {
        depthwise_every_isa(&case2d(6, 6, 6, [13, 45], 5, [1, 1], 2), 9);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random depthwise shapes (channel multiplier 1–2, 1-D or 2-D, kernels 1–5 so every
        /// register-blocked row and the generic one run, strides, dilations, uneven padding).
        #[test]
        fn depthwise_every_isa_random(
            c in 1usize..=3, mult in 1usize..=2, bias: bool, act in 0usize..ACTS.len(), seed in any::<u64>(),
            dims in prop::collection::vec((1usize..=40, 1usize..=5, 1usize..=2, 1usize..=2, 0usize..=2, 0usize..=2), 1..=2),
        ) {
            let nd = dims.len();
            let mut pads: Vec<usize> = dims.iter().map(|d| d.4).collect();
            pads.extend(dims.iter().map(|d| d.5));
            let case = Case {
                n: 1,
                c,
                m: c * mult,
                group: c,
                input: dims.iter().map(|d| d.0).collect(),
                kernel: dims.iter().map(|d| d.1).collect(),
                strides: dims.iter().map(|d| d.2).collect(),
                dil: dims.iter().map(|d| d.3).collect(),
                pads,
                bias,
                act: ACTS[act],
            };
            prop_assume!(case.out_dims().iter().all(|&o| o > 0) && nd <= 2);
            depthwise_every_isa(&case, seed);
        }
    }

    #[test]
    fn fused_conv_rejects_activation_on_f64() {
        let x = Tensor::from_vec(&[1, 1, 2], vec![1f64, 2.]).unwrap();
        let w = Tensor::from_vec(&[1, 1, 1], vec![1f64]).unwrap();
        let mut attrs = act_attrs(Act::Relu);
        attrs.push(ints("strides", &[1]));
        let step = Step { op: "FusedConv".into(), domain: "kiln".into(), opset: 1, outputs: vec![0], attrs, ..Default::default() };
        assert!(crate::cpu::eval_step(&step, &[Some(x), Some(w), None]).is_err());
    }
}
