//! Weight-only int4 ops (domain "kiln"), produced by `--quantize int4`:
//!
//! - `MatMulInt4(A[..., K] f32, W u8, scales f16|f32, zero_points u8?, bias f32[N]?)` with
//!   attributes `K`, `N`, `block_size`, `activation`, `activation_params`: `act(A·Wdq + bias)`.
//! - `GatherInt4(table u8, scales f16|f32, zero_points u8?, indices)` with attributes `dim`,
//!   `block_size`: rows of a `[rows, dim]` table (Gather along axis 0), dequantized.
//!
//! A weight is quantized in blocks of `block_size` consecutive elements along the reduction axis
//! (K for MatMul, `dim` for a table row): `w = (q - z)·s` with q a 4-bit code, one scale s and
//! one zero point z per block (z = 8 when there are no zero points: symmetric).
//!
//! MatMul layout (chosen for the kernel; `quantize_matmul` writes it): columns are grouped into
//! panels of `PANEL` = 16. `W` is `[panels, K, 8]`: row k of a panel is 8 bytes whose byte i holds
//! column 2i in its low nibble and column 2i+1 in its high nibble. `scales` is `[panels, blocks,
//! 16]` and `zero_points` `[panels, blocks, 8]` (nibbles as in `W`); the columns padding the last
//! panel have scale 0. The kernels never expand the weights to floats in memory: each row of a
//! panel is unpacked into a register, dequantized with one FMA (`q·s + (-z·s)`) and multiplied
//! into up to 16 rows of A at once.
//!
//! Table layout: `table` is `[rows, ceil(dim/2)]` (nibbles as above along the row), `scales`
//! `[rows, blocks]`, `zero_points` `[rows, ceil(blocks/2)]`.

use half::f16;
use rayon::prelude::*;

use kiln_runtime::{DType, Error, Result, Tensor};

use crate::cpu::ctx::OpCtx;
use crate::cpu::kernels::fused::act_from_ctx;
use crate::cpu::gemm::{apply_act, Act};
use crate::cpu::isa::{self, Isa};
use crate::cpu::registry::Registry;

/// Columns per weight panel (one AVX-512 vector, two AVX2 vectors).
pub const PANEL: usize = 16;
/// Bytes per panel row.
const PANEL_BYTES: usize = PANEL / 2;

pub fn register(r: &mut Registry) {
    r.add_in("kiln", "MatMulInt4", matmul_int4_kernel);
    r.add_in("kiln", "GatherInt4", gather_int4_kernel);
}

// ---------------------------------------------------------------------------------------------
// Quantization (used by the compiler pass and by the tests)
// ---------------------------------------------------------------------------------------------

/// How a weight is quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int4Format {
    pub block: usize,
    /// Asymmetric (per-block zero point) instead of symmetric.
    pub zero_points: bool,
    /// Scales stored as f16 instead of f32.
    pub f16_scales: bool,
}

/// A quantized weight: the tensors a MatMulInt4 / GatherInt4 node takes.
#[derive(Clone, Debug)]
pub struct Int4Weight {
    pub data: Tensor,
    pub scales: Tensor,
    pub zero_points: Option<Tensor>,
}

impl Int4Weight {
    /// Bytes stored (codes, scales and zero points).
    pub fn bytes(&self) -> usize {
        self.data.bytes().len() + self.scales.bytes().len() + self.zero_points.as_ref().map_or(0, |z| z.bytes().len())
    }
}

/// One block's scale (as stored, already rounded to the storage precision), zero point and codes.
fn quantize_block(vals: &[f32], f: &Int4Format, codes: &mut [u8]) -> Result<(f32, u8)> {
    let stored = |s: f32| -> Result<f32> {
        if !s.is_finite() {
            return Err(Error::Other(format!("int4: non-finite weights or scale {s}")));
        }
        if !f.f16_scales {
            return Ok(s);
        }
        let h = f16::from_f32(s);
        if !h.is_finite() {
            return Err(Error::Other(format!("int4: scale {s} overflows f16 (use f32 scales)")));
        }
        Ok(h.to_f32())
    };
    // Round to nearest on a grid of clipped ranges: shrinking the range a little trades clipping
    // of the extremes for finer steps everywhere else, and the block keeps whichever candidate
    // reconstructs it with the least squared error (the full range is always a candidate).
    // The full range, once: asymmetric blocks span [lo, hi], which includes 0 so that a block of
    // equal values is still represented; symmetric blocks map the value of largest magnitude to
    // code 0 (-8·s), using all 16 levels.
    let (lo, hi, big) = if f.zero_points {
        (vals.iter().fold(0f32, |m, &v| m.min(v)), vals.iter().fold(0f32, |m, &v| m.max(v)), 0.0)
    } else {
        (0.0, 0.0, vals.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m }))
    };
    let mut best: Option<(f64, f32, u8)> = None;
    for i in 0..CLIP_STEPS {
        let shrink = 1.0 - i as f32 * CLIP_STEP;
        let (s, z) = if f.zero_points {
            let (lo, hi) = (lo * shrink, hi * shrink);
            let s = stored((hi - lo) / 15.0)?;
            let z = if s > 0.0 { (-lo / s).round().clamp(0.0, 15.0) as u8 } else { 0 };
            (s, z)
        } else {
            (stored(big * shrink / -8.0)?, 8)
        };
        let err = block_error(vals, s, z);
        if best.is_none_or(|(e, _, _)| err < e) {
            best = Some((err, s, z));
        }
        if s == 0.0 {
            break;
        }
    }
    let (_, s, z) = best.expect("CLIP_STEPS > 0");
    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
    for (c, &v) in codes.iter_mut().zip(vals) {
        *c = code(v, inv, z);
    }
    Ok((s, z))
}

/// Clipped ranges tried per block: 100%, 98%, ... 62% of the full range.
const CLIP_STEPS: usize = 20;
const CLIP_STEP: f32 = 0.02;

/// The 4-bit code of `v` for 1/scale `inv` and zero point `z`.
#[inline]
pub fn code(v: f32, inv: f32, z: u8) -> u8 {
    ((v * inv).round() + z as f32).clamp(0.0, 15.0) as u8
}

/// Squared reconstruction error of a block quantized with scale `s` and zero point `z`.
fn block_error(vals: &[f32], s: f32, z: u8) -> f64 {
    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
    vals.iter()
        .map(|&v| {
            let d = v - (code(v, inv, z) as f32 - z as f32) * s;
            (d as f64) * (d as f64)
        })
        .sum()
}

fn scales_tensor(shape: &[usize], s: Vec<f32>, f16_scales: bool) -> Result<Tensor> {
    if f16_scales {
        Tensor::from_vec(shape, s.into_iter().map(f16::from_f32).collect::<Vec<_>>())
    } else {
        Tensor::from_vec(shape, s)
    }
}

fn check_format(f: &Int4Format) -> Result<()> {
    if f.block == 0 {
        return Err(Error::Other("int4: block size 0".into()));
    }
    Ok(())
}

/// Quantize a row-major `[k, n]` MatMul weight into the panel layout.
pub fn quantize_matmul(w: &[f32], k: usize, n: usize, f: &Int4Format) -> Result<Int4Weight> {
    let (codes, params) = round_matmul(w, k, n, f)?;
    pack_matmul(&codes, &params, k, n, f)
}

/// Round a row-major `[k, n]` weight block by block (`quantize_block`): row-major codes and the
/// (scale, zero point) of block b of column j at `params[b·n + j]`, as `pack_matmul` takes them.
pub fn round_matmul(w: &[f32], k: usize, n: usize, f: &Int4Format) -> Result<(Vec<u8>, Vec<(f32, u8)>)> {
    check_format(f)?;
    if w.len() != k * n {
        return Err(Error::Shape(format!("int4: weight of {} values for [{k}, {n}]", w.len())));
    }
    let blocks = k.div_ceil(f.block);
    let mut codes = vec![0u8; k * n];
    let mut params = vec![(0f32, 0u8); blocks * n];
    let mut vals = vec![0f32; f.block];
    let mut bc = vec![0u8; f.block];
    for j in 0..n {
        for b in 0..blocks {
            let (k0, k1) = (b * f.block, ((b + 1) * f.block).min(k));
            let len = k1 - k0;
            for (i, v) in vals[..len].iter_mut().enumerate() {
                *v = w[(k0 + i) * n + j];
            }
            params[b * n + j] = quantize_block(&vals[..len], f, &mut bc[..len])?;
            for (i, &q) in bc[..len].iter().enumerate() {
                codes[(k0 + i) * n + j] = q;
            }
        }
    }
    Ok((codes, params))
}

/// Pack row-major `[k, n]` codes and per-block (scale, zero point) pairs (`params[b·n + j]` for
/// block b of column j, scales already at storage precision) into the panel layout. Rounding
/// schemes other than `quantize_matmul`'s (GPTQ) choose the codes and pack them here.
pub fn pack_matmul(codes: &[u8], params: &[(f32, u8)], k: usize, n: usize, f: &Int4Format) -> Result<Int4Weight> {
    check_format(f)?;
    let blocks = k.div_ceil(f.block);
    if codes.len() != k * n || params.len() != blocks * n {
        return Err(Error::Shape(format!("int4: {} codes and {} block parameters for [{k}, {n}]", codes.len(), params.len())));
    }
    let panels = n.div_ceil(PANEL);
    let mut data = vec![0u8; panels * k * PANEL_BYTES];
    let mut scales = vec![0f32; panels * blocks * PANEL];
    let mut zps = vec![0u8; panels * blocks * PANEL_BYTES];
    for j in 0..n {
        let (p, c) = (j / PANEL, j % PANEL);
        for b in 0..blocks {
            let (s, z) = params[b * n + j];
            scales[(p * blocks + b) * PANEL + c] = s;
            set_nibble(&mut zps[(p * blocks + b) * PANEL_BYTES..], c, z);
        }
        for r in 0..k {
            set_nibble(&mut data[(p * k + r) * PANEL_BYTES..], c, codes[r * n + j]);
        }
    }
    Ok(Int4Weight {
        data: Tensor::from_vec(&[panels, k, PANEL_BYTES], data)?,
        scales: scales_tensor(&[panels, blocks, PANEL], scales, f.f16_scales)?,
        zero_points: if f.zero_points { Some(Tensor::from_vec(&[panels, blocks, PANEL_BYTES], zps)?) } else { None },
    })
}

/// Quantize a row-major `[rows, dim]` table (blocks along each row).
pub fn quantize_table(t: &[f32], rows: usize, dim: usize, f: &Int4Format) -> Result<Int4Weight> {
    check_format(f)?;
    if t.len() != rows * dim {
        return Err(Error::Shape(format!("int4: table of {} values for [{rows}, {dim}]", t.len())));
    }
    let blocks = dim.div_ceil(f.block);
    let (rb, zb) = (dim.div_ceil(2), blocks.div_ceil(2));
    let mut data = vec![0u8; rows * rb];
    let mut scales = vec![0f32; rows * blocks];
    let mut zps = vec![0u8; rows * zb];
    // Rows are independent; the block search makes this the slow part of compiling an embedding.
    let rows_out = data.par_chunks_mut(rb.max(1)).zip(scales.par_chunks_mut(blocks.max(1))).zip(zps.par_chunks_mut(zb.max(1)));
    rows_out.enumerate().try_for_each_init(
        || vec![0u8; f.block],
        |codes, (r, ((data, scales), zps))| -> Result<()> {
            for b in 0..blocks {
                let (c0, c1) = (b * f.block, ((b + 1) * f.block).min(dim));
                let (s, z) = quantize_block(&t[r * dim + c0..r * dim + c1], f, &mut codes[..c1 - c0])?;
                scales[b] = s;
                set_nibble(zps, b, z);
                for (i, &q) in codes[..c1 - c0].iter().enumerate() {
                    set_nibble(data, c0 + i, q);
                }
            }
            Ok(())
        },
    )?;
    Ok(Int4Weight {
        data: Tensor::from_vec(&[rows, rb], data)?,
        scales: scales_tensor(&[rows, blocks], scales, f.f16_scales)?,
        zero_points: if f.zero_points { Some(Tensor::from_vec(&[rows, zb], zps)?) } else { None },
    })
}

fn set_nibble(bytes: &mut [u8], i: usize, q: u8) {
    let b = &mut bytes[i / 2];
    if i % 2 == 0 {
        *b = (*b & 0xF0) | (q & 15);
    } else {
        *b = (*b & 0x0F) | ((q & 15) << 4);
    }
}

#[inline(always)]
fn nibble(bytes: &[u8], i: usize) -> u8 {
    (bytes[i / 2] >> ((i % 2) * 4)) & 15
}

/// Scales as either stored dtype.
#[derive(Clone, Copy)]
enum Scales<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl<'a> Scales<'a> {
    fn of(t: &'a Tensor) -> Result<Scales<'a>> {
        match t.dtype() {
            DType::F16 => Ok(Scales::F16(t.view::<f16>()?)),
            DType::F32 => Ok(Scales::F32(t.view::<f32>()?)),
            d => Err(Error::DType(format!("int4: scales are {d}, expected f16 or f32"))),
        }
    }

    fn len(&self) -> usize {
        match self {
            Scales::F16(s) => s.len(),
            Scales::F32(s) => s.len(),
        }
    }

    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F16(s) => s[i].to_f32(),
            Scales::F32(s) => s[i],
        }
    }
}

/// A quantized MatMul weight as the kernel reads it, sizes checked.
#[derive(Clone, Copy)]
struct Weights<'a> {
    k: usize,
    n: usize,
    block: usize,
    data: &'a [u8],
    scales: Scales<'a>,
    zps: Option<&'a [u8]>,
}

impl<'a> Weights<'a> {
    fn new(k: usize, n: usize, block: usize, data: &'a Tensor, scales: &'a Tensor, zps: Option<&'a Tensor>) -> Result<Self> {
        if block == 0 {
            return Err(Error::Other("MatMulInt4: block_size 0".into()));
        }
        let (panels, blocks) = (n.div_ceil(PANEL), k.div_ceil(block));
        let bad = |what: &str, got: usize, want: usize| {
            Err(Error::Shape(format!("MatMulInt4 K={k} N={n} block {block}: {what} has {got} elements, expected {want}")))
        };
        if data.dtype() != DType::U8 || data.len() != panels * k * PANEL_BYTES {
            return bad("packed weight (u8)", data.len(), panels * k * PANEL_BYTES);
        }
        let scales = Scales::of(scales)?;
        if scales.len() != panels * blocks * PANEL {
            return bad("scales", scales.len(), panels * blocks * PANEL);
        }
        let zps = match zps {
            Some(z) if z.dtype() != DType::U8 || z.len() != panels * blocks * PANEL_BYTES => {
                return bad("zero points (u8)", z.len(), panels * blocks * PANEL_BYTES)
            }
            Some(z) => Some(z.view::<u8>()?),
            None => None,
        };
        Ok(Weights { k, n, block, data: data.view::<u8>()?, scales, zps })
    }

    fn blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// Dequantized element (k, j) (scalar reference path and tests).
    fn at(&self, k: usize, j: usize) -> f32 {
        let (p, c, b) = (j / PANEL, j % PANEL, k / self.block);
        let q = nibble(&self.data[(p * self.k + k) * PANEL_BYTES..], c) as f32;
        let sb = (p * self.blocks() + b) * PANEL;
        let z = self.zps.map_or(8, |z| nibble(&z[sb / 2..], c)) as f32;
        (q - z) * self.scales.get(sb + c)
    }
}

/// Dequantize a MatMul weight back to row-major `[k, n]` (for measuring quantization error).
pub fn dequantize_matmul(w: &Int4Weight, k: usize, n: usize, block: usize) -> Result<Vec<f32>> {
    let w = Weights::new(k, n, block, &w.data, &w.scales, w.zero_points.as_ref())?;
    let mut out = vec![0f32; k * n];
    for kk in 0..k {
        for j in 0..n {
            out[kk * n + j] = w.at(kk, j);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// MatMulInt4
// ---------------------------------------------------------------------------------------------


fn dim_attr(ctx: &OpCtx, name: &str) -> Result<usize> {
    match ctx.attr_i_opt(name) {
        Some(v) if v >= 0 => Ok(v as usize),
        Some(v) => Err(Error::Other(format!("{}: attribute {name} = {v}", ctx.op()))),
        None => Err(Error::Other(format!("{}: attribute {name} is missing", ctx.op()))),
    }
}

fn matmul_int4_kernel(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.input(inputs, 0)?;
    let (k, n, block) = (dim_attr(ctx, "K")?, dim_attr(ctx, "N")?, dim_attr(ctx, "block_size")?);
    let w = Weights::new(k, n, block, ctx.input(inputs, 1)?, ctx.input(inputs, 2)?, ctx.opt_input(inputs, 3))?;
    if a.dtype() != DType::F32 {
        return Err(Error::DType(format!("MatMulInt4: A is {}, expected f32", a.dtype())));
    }
    if a.rank() < 1 || a.shape()[a.rank() - 1] != k {
        return Err(Error::Shape(format!("MatMulInt4: A {:?} for K={k}", a.shape())));
    }
    let bias = match ctx.opt_input(inputs, 4) {
        Some(b) if b.dtype() == DType::F32 && b.len() == n => Some(b.view::<f32>()?),
        Some(b) => return Err(Error::Shape(format!("MatMulInt4: bias {} {:?} for {n} columns", b.dtype(), b.shape()))),
        None => None,
    };
    let act = act_from_ctx(ctx)?;
    let m = if k == 0 { a.shape()[..a.rank() - 1].iter().product() } else { a.len() / k };
    let mut out_shape = a.shape().to_vec();
    *out_shape.last_mut().unwrap() = n;
    let mut c = vec![0f32; m * n];
    matmul(isa::active(), a.view::<f32>()?, m, &w, bias, act, &mut c, true);
    Ok(vec![Tensor::from_vec(&out_shape, c)?])
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of the output (see `matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method so closures capture the whole (Sync) wrapper, not the raw field.
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Largest row tile each ISA's kernel takes (bounded by its vector registers).
fn max_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 16,
        Isa::Avx2Fma => 4,
        _ => 8,
    }
}

/// Row tiles `(start, rows)` covering `0..m`, as even as possible and at most `mr` high.
fn row_tiles(m: usize, mr: usize) -> Vec<(usize, usize)> {
    let t = m.div_ceil(mr);
    (0..t).map(|i| (i * m / t, (i + 1) * m / t - i * m / t)).filter(|&(_, r)| r > 0).collect()
}

/// `c = act(a·W + bias)`; a is `[m, k]`, c `[m, n]`, both row-major.
#[allow(clippy::too_many_arguments)]
fn matmul(isa: Isa, a: &[f32], m: usize, w: &Weights, bias: Option<&[f32]>, act: Act, c: &mut [f32], parallel: bool) {
    let isa = if isa.supported() { isa } else { isa::best() };
    let (k, n) = (w.k, w.n);
    if m == 0 || n == 0 {
        return;
    }
    let tiles = row_tiles(m, max_rows(isa));
    // A is repacked tile by tile as [k][rows] so a kernel broadcasts a[i, kk] from one pointer.
    let mut apack = vec![0f32; m * k];
    for &(r0, rows) in &tiles {
        let dst = &mut apack[r0 * k..(r0 + rows) * k];
        for i in 0..rows {
            for kk in 0..k {
                dst[kk * rows + i] = a[(r0 + i) * k + kk];
            }
        }
    }
    let panels = n.div_ceil(PANEL);
    const MIN_TASK: usize = 1 << 18; // multiply-adds per task, well above rayon's cost
    let threads = if parallel { crate::cpu::par::threads() } else { 1 };
    let tasks = threads.min(panels).min((m * n * k / MIN_TASK).max(1)).max(1);
    let out = OutPtr(c.as_mut_ptr());
    let run = |t: usize| {
        let (p0, p1) = (t * panels / tasks, (t + 1) * panels / tasks);
        let mut tile = [0f32; 16 * PANEL];
        for p in p0..p1 {
            let cols = PANEL.min(n - p * PANEL);
            for &(r0, rows) in &tiles {
                run_tile(isa, w, p, &apack[r0 * k..(r0 + rows) * k], rows, &mut tile);
                for i in 0..rows {
                    // SAFETY: row r0+i, columns p·PANEL.. +cols lie in c (m·n floats); this task
                    // owns panels p0..p1, so no other task writes these columns.
                    unsafe {
                        let dst = out.at((r0 + i) * n + p * PANEL);
                        std::ptr::copy_nonoverlapping(tile.as_ptr().add(i * PANEL), dst, cols);
                    }
                }
            }
        }
        let (j0, j1) = (p0 * PANEL, (p1 * PANEL).min(n));
        if j0 < j1 && (bias.is_some() || act != Act::None) {
            for i in 0..m {
                // SAFETY: as above; columns j0..j1 belong to this task.
                let row = unsafe { std::slice::from_raw_parts_mut(out.at(i * n + j0), j1 - j0) };
                epilogue(isa, row, bias.map(|b| &b[j0..j1]), act);
            }
        }
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

fn epilogue(isa: Isa, row: &mut [f32], bias: Option<&[f32]>, act: Act) {
    match isa {
        // SAFETY: `matmul` only passes ISAs the CPU supports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2Fma => unsafe { x86::epilogue_avx2(row, bias, act) },
        _ => epilogue_rows(row, bias, act),
    }
}

#[inline(always)]
fn epilogue_rows(row: &mut [f32], bias: Option<&[f32]>, act: Act) {
    if let Some(b) = bias {
        for (x, &bv) in row.iter_mut().zip(b) {
            *x += bv;
        }
    }
    apply_act(row, act);
}

/// One row tile (`rows` ≤ `max_rows(isa)`) times panel `p` into `tile[i·PANEL + c]`.
fn run_tile(isa: Isa, w: &Weights, p: usize, a: &[f32], rows: usize, tile: &mut [f32; 16 * PANEL]) {
    let args = PanelArgs::new(w, p);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::tile_avx512(&args, a, rows, tile),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => x86::tile_avx2(&args, a, rows, tile),
        _ => tile_scalar(&args, a, rows, tile),
    }
}

/// One panel's codes, scales and zero points.
struct PanelArgs<'a> {
    k: usize,
    block: usize,
    /// k rows of PANEL_BYTES.
    data: &'a [u8],
    scales: Scales<'a>,
    /// Index of this panel's first scale.
    s0: usize,
    /// blocks rows of PANEL_BYTES.
    zps: Option<&'a [u8]>,
}

impl<'a> PanelArgs<'a> {
    fn new(w: &Weights<'a>, p: usize) -> Self {
        let blocks = w.blocks();
        PanelArgs {
            k: w.k,
            block: w.block,
            data: &w.data[p * w.k * PANEL_BYTES..(p + 1) * w.k * PANEL_BYTES],
            scales: w.scales,
            s0: p * blocks * PANEL,
            zps: w.zps.map(|z| &z[p * blocks * PANEL_BYTES..(p + 1) * blocks * PANEL_BYTES]),
        }
    }

    /// Block b's per-column scale s and offset -z·s.
    #[inline(always)]
    fn scale_offset(&self, b: usize) -> ([f32; PANEL], [f32; PANEL]) {
        let mut s = [0f32; PANEL];
        let mut o = [0f32; PANEL];
        for c in 0..PANEL {
            s[c] = self.scales.get(self.s0 + b * PANEL + c);
            let z = self.zps.map_or(8, |z| nibble(&z[b * PANEL_BYTES..], c));
            o[c] = -(z as f32) * s[c];
        }
        (s, o)
    }
}

fn tile_scalar(args: &PanelArgs, a: &[f32], rows: usize, tile: &mut [f32; 16 * PANEL]) {
    let mut acc = [[0f32; PANEL]; 16];
    let mut wv = [0f32; PANEL];
    for b in 0..args.k.div_ceil(args.block) {
        let (s, o) = args.scale_offset(b);
        for kk in b * args.block..((b + 1) * args.block).min(args.k) {
            let bytes = &args.data[kk * PANEL_BYTES..(kk + 1) * PANEL_BYTES];
            for c in 0..PANEL {
                wv[c] = nibble(bytes, c) as f32 * s[c] + o[c];
            }
            for (i, acc) in acc.iter_mut().enumerate().take(rows) {
                let av = a[kk * rows + i];
                for c in 0..PANEL {
                    acc[c] += av * wv[c];
                }
            }
        }
    }
    for i in 0..rows {
        tile[i * PANEL..(i + 1) * PANEL].copy_from_slice(&acc[i]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    // Register tiles are indexed by row on purpose.
    #![allow(clippy::needless_range_loop)]

    use std::arch::x86_64::*;

    use super::{epilogue_rows, Act, PanelArgs, Scales, PANEL, PANEL_BYTES};

    /// Dispatch a runtime row count to the const-generic kernel.
    macro_rules! by_rows {
        ($rows:expr, $f:ident, $x:expr, $y:expr, $z:expr; $($n:literal)*) => {
            match $rows {
                $($n => $f::<$n>($x, $y, $z),)*
                _ => unreachable!("row tile larger than the kernel's"),
            }
        };
    }

    pub(super) fn tile_avx512(args: &PanelArgs, a: &[f32], rows: usize, tile: &mut [f32; 16 * PANEL]) {
        assert!(a.len() >= rows * args.k && rows <= 16);
        // SAFETY: the caller dispatches here only when the CPU has AVX-512 (isa::active/best);
        // `a` holds k·rows floats and `args` slices were bounds-checked by `Weights::new`.
        unsafe { by_rows!(rows, avx512, args, a.as_ptr(), tile; 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16) }
    }

    pub(super) fn tile_avx2(args: &PanelArgs, a: &[f32], rows: usize, tile: &mut [f32; 16 * PANEL]) {
        assert!(a.len() >= rows * args.k && rows <= 4);
        // SAFETY: as above, with AVX2+FMA.
        unsafe { by_rows!(rows, avx2, args, a.as_ptr(), tile; 1 2 3 4) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn epilogue_avx2(row: &mut [f32], bias: Option<&[f32]>, act: Act) {
        epilogue_rows(row, bias, act)
    }

    /// 16 nibbles (8 bytes at `p`) as 16 bytes in column order.
    #[inline(always)]
    unsafe fn nibbles8(p: *const u8) -> __m128i {
        let bytes = _mm_loadl_epi64(p as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(bytes, m);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), m);
        _mm_unpacklo_epi8(lo, hi)
    }

    /// Rows k and k+1 (16 bytes at `p`) as two 16-byte vectors of codes in column order.
    #[inline(always)]
    unsafe fn nibbles16(p: *const u8) -> (__m128i, __m128i) {
        let bytes = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(bytes, m);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), m);
        (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi))
    }

    #[inline(always)]
    unsafe fn codes512(v: __m128i) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v))
    }

    /// Block b's scales and offsets (-z·s) for the 16 columns.
    #[inline(always)]
    unsafe fn scale_offset512(args: &PanelArgs, b: usize) -> (__m512, __m512) {
        let i = args.s0 + b * PANEL;
        let s = match args.scales {
            Scales::F16(s) => _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().add(i) as *const __m256i)),
            Scales::F32(s) => _mm512_loadu_ps(s.as_ptr().add(i)),
        };
        let z = match args.zps {
            Some(z) => codes512(nibbles8(z.as_ptr().add(b * PANEL_BYTES))),
            None => _mm512_set1_ps(8.0),
        };
        (s, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, s)))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn avx512<const R: usize>(args: &PanelArgs, a: *const f32, tile: &mut [f32; 16 * PANEL]) {
        // Two accumulator sets (even / odd k) when few rows: more independent FMA chains.
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        let dual = R <= 8;
        let wp = args.data.as_ptr();
        for b in 0..args.k.div_ceil(args.block) {
            let (s, o) = scale_offset512(args, b);
            let (k0, k1) = (b * args.block, ((b + 1) * args.block).min(args.k));
            let mut kk = k0;
            while kk + 2 <= k1 {
                let (v0, v1) = nibbles16(wp.add(kk * PANEL_BYTES));
                let w0 = _mm512_fmadd_ps(codes512(v0), s, o);
                let w1 = _mm512_fmadd_ps(codes512(v1), s, o);
                let a0 = a.add(kk * R);
                let a1 = a.add((kk + 1) * R);
                for i in 0..R {
                    acc0[i] = _mm512_fmadd_ps(_mm512_set1_ps(*a0.add(i)), w0, acc0[i]);
                    if dual {
                        acc1[i] = _mm512_fmadd_ps(_mm512_set1_ps(*a1.add(i)), w1, acc1[i]);
                    } else {
                        acc0[i] = _mm512_fmadd_ps(_mm512_set1_ps(*a1.add(i)), w1, acc0[i]);
                    }
                }
                kk += 2;
            }
            if kk < k1 {
                let w0 = _mm512_fmadd_ps(codes512(nibbles8(wp.add(kk * PANEL_BYTES))), s, o);
                let a0 = a.add(kk * R);
                for i in 0..R {
                    acc0[i] = _mm512_fmadd_ps(_mm512_set1_ps(*a0.add(i)), w0, acc0[i]);
                }
            }
        }
        for i in 0..R {
            let v = if dual { _mm512_add_ps(acc0[i], acc1[i]) } else { acc0[i] };
            _mm512_storeu_ps(tile.as_mut_ptr().add(i * PANEL), v);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2<const R: usize>(args: &PanelArgs, a: *const f32, tile: &mut [f32; 16 * PANEL]) {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        let wp = args.data.as_ptr();
        let codes = |v: __m128i| {
            (_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))))
        };
        for b in 0..args.k.div_ceil(args.block) {
            let i = args.s0 + b * PANEL;
            let (s0, s1) = match args.scales {
                Scales::F16(s) => {
                    let p = s.as_ptr().add(i) as *const __m128i;
                    (_mm256_cvtph_ps(_mm_loadu_si128(p)), _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))))
                }
                Scales::F32(s) => (_mm256_loadu_ps(s.as_ptr().add(i)), _mm256_loadu_ps(s.as_ptr().add(i + 8))),
            };
            let (z0, z1) = match args.zps {
                Some(z) => codes(nibbles8(z.as_ptr().add(b * PANEL_BYTES))),
                None => (_mm256_set1_ps(8.0), _mm256_set1_ps(8.0)),
            };
            let zero = _mm256_setzero_ps();
            let (o0, o1) = (_mm256_fnmadd_ps(z0, s0, zero), _mm256_fnmadd_ps(z1, s1, zero));
            for kk in b * args.block..((b + 1) * args.block).min(args.k) {
                let (q0, q1) = codes(nibbles8(wp.add(kk * PANEL_BYTES)));
                let w0 = _mm256_fmadd_ps(q0, s0, o0);
                let w1 = _mm256_fmadd_ps(q1, s1, o1);
                let ak = a.add(kk * R);
                for r in 0..R {
                    let av = _mm256_set1_ps(*ak.add(r));
                    lo[r] = _mm256_fmadd_ps(av, w0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(av, w1, hi[r]);
                }
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(tile.as_mut_ptr().add(r * PANEL), lo[r]);
            _mm256_storeu_ps(tile.as_mut_ptr().add(r * PANEL + 8), hi[r]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GatherInt4
// ---------------------------------------------------------------------------------------------

fn gather_int4_kernel(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let table = ctx.input(inputs, 0)?;
    let scales = Scales::of(ctx.input(inputs, 1)?)?;
    let zps = ctx.opt_input(inputs, 2);
    let idx = ctx.input(inputs, 3)?;
    let (dim, block) = (dim_attr(ctx, "dim")?, dim_attr(ctx, "block_size")?);
    if block == 0 {
        return Err(Error::Other("GatherInt4: block_size 0".into()));
    }
    let (rb, blocks) = (dim.div_ceil(2), dim.div_ceil(block));
    if table.dtype() != DType::U8 || table.rank() != 2 || table.shape()[1] != rb {
        return Err(Error::Shape(format!("GatherInt4: table {} {:?} for dim {dim}", table.dtype(), table.shape())));
    }
    let rows = table.shape()[0];
    if scales.len() != rows * blocks {
        return Err(Error::Shape(format!("GatherInt4: {} scales for {rows} rows of {blocks} blocks", scales.len())));
    }
    let zb = blocks.div_ceil(2);
    let zps = match zps {
        Some(z) if z.dtype() != DType::U8 || z.len() != rows * zb => {
            return Err(Error::Shape(format!("GatherInt4: zero points {} {:?}", z.dtype(), z.shape())))
        }
        Some(z) => Some(z.view::<u8>()?),
        None => None,
    };
    if !matches!(idx.dtype(), DType::I64 | DType::I32) {
        return Err(Error::DType(format!("GatherInt4: indices are {}", idx.dtype())));
    }
    let data = table.view::<u8>()?;
    let ids = idx.to_i64_vec()?;
    let mut out = vec![0f32; ids.len() * dim];
    for (o, &id) in out.chunks_mut(dim.max(1)).zip(&ids) {
        let r = if id < 0 { id + rows as i64 } else { id };
        if r < 0 || r >= rows as i64 {
            return Err(Error::Other(format!("GatherInt4: index {id} out of range for {rows} rows")));
        }
        let r = r as usize;
        let codes = &data[r * rb..(r + 1) * rb];
        for b in 0..blocks {
            let s = scales.get(r * blocks + b);
            let z = zps.map_or(8, |z| nibble(&z[r * zb..], b)) as f32;
            for c in b * block..((b + 1) * block).min(dim) {
                o[c] = (nibble(codes, c) as f32 - z) * s;
            }
        }
    }
    let mut shape = idx.shape().to_vec();
    shape.push(dim);
    Ok(vec![Tensor::from_vec(&shape, out)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::act_scalar;
    use crate::cpu::isa::available;
    use crate::cpu::kernels::elementwise::testing::rand_f32;
    use kiln_runtime::manifest::{Attr, Step};


    const FORMATS: [Int4Format; 4] = [
        Int4Format { block: 32, zero_points: false, f16_scales: true },
        Int4Format { block: 64, zero_points: true, f16_scales: true },
        Int4Format { block: 128, zero_points: false, f16_scales: false },
        Int4Format { block: 32, zero_points: true, f16_scales: false },
    ];

    /// Dequantize-then-matmul in f64 (independent of the kernels' code paths).
    fn reference(a: &[f32], m: usize, wdq: &[f32], k: usize, n: usize, bias: Option<&[f32]>, act: Act) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += a[i * k + kk] as f64 * wdq[kk * n + j] as f64;
                }
                let v = s as f32 + bias.map_or(0.0, |b| b[j]);
                c[i * n + j] = act_scalar(v, act);
            }
        }
        c
    }

    /// Dequantized weight straight from the format's definition (not `Weights::at`).
    fn dequant_by_definition(q: &Int4Weight, k: usize, n: usize, f: &Int4Format) -> Vec<f32> {
        let data = q.data.view::<u8>().unwrap();
        let s = q.scales.to_f64_vec().unwrap();
        let blocks = k.div_ceil(f.block);
        let mut out = vec![0f32; k * n];
        for kk in 0..k {
            for j in 0..n {
                let (p, c, b) = (j / 16, j % 16, kk / f.block);
                let byte = data[(p * k + kk) * 8 + c / 2];
                let code = if c % 2 == 0 { byte & 15 } else { byte >> 4 } as f64;
                let z = match &q.zero_points {
                    Some(z) => {
                        let zb = z.view::<u8>().unwrap()[(p * blocks + b) * 8 + c / 2];
                        (if c % 2 == 0 { zb & 15 } else { zb >> 4 }) as f64
                    }
                    None => 8.0,
                };
                out[kk * n + j] = ((code - z) * s[(p * blocks + b) * 16 + c]) as f32;
            }
        }
        out
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-4 + 1e-4 * w.abs(), "{what}: [{i}] {g} vs {w}");
        }
    }

    #[test]
    fn quantization_error_is_at_most_plain_rounding() {
        // Plain round-to-nearest over each block's full range, by definition: the clipped-range
        // search keeps it as a candidate, so no block may come out worse.
        fn plain(v: &[f32], zero_points: bool) -> f64 {
            let (s, z) = if zero_points {
                let lo = v.iter().fold(0f32, |m, &x| m.min(x));
                let hi = v.iter().fold(0f32, |m, &x| m.max(x));
                let s = (hi - lo) / 15.0;
                (s, if s > 0.0 { (-lo / s).round().clamp(0.0, 15.0) } else { 0.0 })
            } else {
                (v.iter().fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m }) / -8.0, 8.0)
            };
            let q = |x: f32| if s == 0.0 { z } else { ((x / s).round() + z).clamp(0.0, 15.0) };
            v.iter().map(|&x| ((x - (q(x) - z) * s) as f64).powi(2)).sum()
        }
        for f in FORMATS {
            let (k, n) = (77, 21);
            let w = rand_f32(k * n, 3, 1.0);
            let q = quantize_matmul(&w, k, n, &f).unwrap();
            let dq = dequant_by_definition(&q, k, n, &f);
            assert_eq!(dequantize_matmul(&q, k, n, f.block).unwrap(), dq);
            for j in 0..n {
                for k0 in (0..k).step_by(f.block) {
                    let rows = k0..(k0 + f.block).min(k);
                    let col: Vec<f32> = rows.clone().map(|r| w[r * n + j]).collect();
                    let got: f64 = rows.map(|r| ((w[r * n + j] - dq[r * n + j]) as f64).powi(2)).sum();
                    // f16 scales round the chosen scale, so allow that rounding's share.
                    let slack = if f.f16_scales { 1.01 } else { 1.0 + 1e-9 };
                    let want = plain(&col, f.zero_points);
                    assert!(got <= want * slack + 1e-12, "{f:?} column {j} block {k0}: {got} > {want}");
                }
            }
        }
    }

    #[test]
    fn block_extremes_are_exact_and_zeros_stay_zero() {
        // Symmetric: the largest magnitude maps to code 0 exactly. Asymmetric: min and max of a
        // block whose range includes 0 are representable within f16 rounding; all-zero blocks are 0.
        let mut w = vec![0f32; 64];
        w[5] = -3.0;
        w[9] = 1.5;
        let f = Int4Format { block: 32, zero_points: false, f16_scales: false };
        let dq = dequantize_matmul(&quantize_matmul(&w, 64, 1, &f).unwrap(), 64, 1, 32).unwrap();
        assert_eq!(dq[5], -3.0);
        assert_eq!(dq[9], 1.5);
        assert!(dq[32..].iter().all(|&v| v == 0.0));
        let f = Int4Format { block: 32, zero_points: true, f16_scales: false };
        let dq = dequantize_matmul(&quantize_matmul(&w, 64, 1, &f).unwrap(), 64, 1, 32).unwrap();
        assert!((dq[5] + 3.0).abs() < 1e-6 && dq[32..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn matmul_matches_dequantized_reference_on_every_isa() {
        let shapes = [(1, 1, 1), (1, 33, 17), (3, 64, 16), (5, 100, 31), (16, 384, 40), (17, 200, 33), (40, 96, 7), (2, 130, 48)];
        let acts = [Act::None, Act::Relu, Act::GeluErf];
        for (si, &(m, k, n)) in shapes.iter().enumerate() {
            for (fi, f) in FORMATS.iter().enumerate() {
                let w = rand_f32(k * n, (si * 7 + fi) as u64, 1.0);
                let a = rand_f32(m * k, 100 + si as u64, 1.0);
                let bias = rand_f32(n, 200 + si as u64, 1.0);
                let q = quantize_matmul(&w, k, n, f).unwrap();
                let wdq = dequant_by_definition(&q, k, n, f);
                let weights = Weights::new(k, n, f.block, &q.data, &q.scales, q.zero_points.as_ref()).unwrap();
                let act = acts[(si + fi) % acts.len()];
                let with_bias = (si + fi) % 2 == 0;
                let b = with_bias.then_some(bias.as_slice());
                let want = reference(&a, m, &wdq, k, n, b, act);
                for isa in available() {
                    for parallel in [false, true] {
                        let mut c = vec![f32::NAN; m * n];
                        matmul(isa, &a, m, &weights, b, act, &mut c, parallel);
                        close(&c, &want, &format!("{isa} m={m} k={k} n={n} {f:?} {act:?} bias={with_bias}"));
                    }
                }
            }
        }
    }

    fn step(op: &str, ints: &[(&str, i64)], s: &[(&str, &str)]) -> Step {
        let mut attrs: Vec<Attr> = ints.iter().map(|&(n, i)| Attr { name: n.into(), i, ..Default::default() }).collect();
        attrs.extend(s.iter().map(|&(n, v)| Attr { name: n.into(), s: v.as_bytes().to_vec(), ..Default::default() }));
        Step { op: op.into(), domain: "kiln".into(), opset: 1, attrs, outputs: vec![0], ..Default::default() }
    }

    fn run(s: &Step, inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        match crate::cpu::registry().get("kiln", &s.op) {
            Some(crate::cpu::Kernel::Tensor(k)) => k(&OpCtx::new(s, None), &inputs),
            _ => panic!("no kernel for {}", s.op),
        }
    }

    #[test]
    fn matmul_node_keeps_leading_dims_and_rejects_bad_inputs() {
        let (k, n) = (40, 9);
        let f = FORMATS[1];
        let q = quantize_matmul(&rand_f32(k * n, 1, 1.0), k, n, &f).unwrap();
        let a = Tensor::from_vec(&[2, 3, k], rand_f32(6 * k, 2, 1.0)).unwrap();
        let bias = Tensor::from_vec(&[n], rand_f32(n, 3, 1.0)).unwrap();
        let s = step("MatMulInt4", &[("K", k as i64), ("N", n as i64), ("block_size", 64)], &[("activation", "Relu")]);
        let ins = |a: &Tensor, b: Option<Tensor>| vec![Some(a.clone()), Some(q.data.clone()), Some(q.scales.clone()), q.zero_points.clone(), b];
        let y = run(&s, ins(&a, Some(bias.clone()))).unwrap();
        assert_eq!(y[0].shape(), &[2, 3, n]);
        let want = reference(a.view::<f32>().unwrap(), 6, &dequant_by_definition(&q, k, n, &f), k, n, Some(bias.view::<f32>().unwrap()), Act::Relu);
        close(y[0].view::<f32>().unwrap(), &want, "node");
        // Wrong K, wrong bias length, wrong block size, wrong A dtype, unknown activation.
        let a_bad = Tensor::from_vec(&[2, k + 1], rand_f32(2 * k + 2, 2, 1.0)).unwrap();
        assert!(run(&s, ins(&a_bad, None)).is_err());
        assert!(run(&s, ins(&a, Some(Tensor::from_vec(&[n + 1], rand_f32(n + 1, 3, 1.0)).unwrap()))).is_err());
        let s32 = step("MatMulInt4", &[("K", k as i64), ("N", n as i64), ("block_size", 32)], &[]);
        assert!(run(&s32, ins(&a, None)).is_err());
        assert!(run(&s, ins(&Tensor::from_vec(&[1, k], vec![0f64; k]).unwrap(), None)).is_err());
        let sa = step("MatMulInt4", &[("K", k as i64), ("N", n as i64), ("block_size", 64)], &[("activation", "Nope")]);
        assert!(run(&sa, ins(&a, None)).is_err());
        let missing = step("MatMulInt4", &[("K", k as i64), ("block_size", 64)], &[]);
        assert!(run(&missing, ins(&a, None)).is_err());
    }

    #[test]
    fn gather_dequantizes_rows_and_checks_indices() {
        for f in FORMATS {
            let (rows, dim) = (11, 75);
            let t = rand_f32(rows * dim, 9, 1.0);
            let q = quantize_table(&t, rows, dim, &f).unwrap();
            let s = step("GatherInt4", &[("dim", dim as i64), ("block_size", f.block as i64)], &[]);
            let idx = Tensor::from_vec(&[2, 2], vec![0i64, 10, -1, 4]).unwrap();
            let y = run(&s, vec![Some(q.data.clone()), Some(q.scales.clone()), q.zero_points.clone(), Some(idx)]).unwrap();
            assert_eq!(y[0].shape(), &[2, 2, dim]);
            let y = y[0].view::<f32>().unwrap();
            // Dequantized rows are a table quantized like a [dim, 1] MatMul weight, row by row.
            let scales = q.scales.to_f64_vec().unwrap();
            let smax = scales.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (o, &r) in [0usize, 10, 10, 4].iter().enumerate() {
                let want = dequantize_matmul(&quantize_matmul(&t[r * dim..(r + 1) * dim], dim, 1, &f).unwrap(), dim, 1, f.block).unwrap();
                close(&y[o * dim..(o + 1) * dim], &want, &format!("gather row {r} {f:?}"));
                for (g, x) in y[o * dim..(o + 1) * dim].iter().zip(&t[r * dim..(r + 1) * dim]) {
                    assert!(((g - x).abs() as f64) <= 1.0001 * smax);
                }
            }
            let bad = Tensor::from_vec(&[1], vec![11i64]).unwrap();
            assert!(run(&s, vec![Some(q.data.clone()), Some(q.scales.clone()), q.zero_points.clone(), Some(bad)]).is_err());
            let bad = Tensor::from_vec(&[1], vec![-12i64]).unwrap();
            assert!(run(&s, vec![Some(q.data.clone()), Some(q.scales.clone()), q.zero_points.clone(), Some(bad)]).is_err());
        }
    }

    #[test]
    fn row_tiles_cover_every_row_once() {
        for m in 1..60 {
            for mr in [1, 4, 8, 16] {
                let t = row_tiles(m, mr);
                assert!(t.iter().all(|&(_, r)| r >= 1 && r <= mr));
                assert_eq!(t.iter().map(|&(_, r)| r).sum::<usize>(), m);
                assert!(t.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
            }
        }
    }
}
