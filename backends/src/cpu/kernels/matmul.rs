//! Matrix products: MatMul, Gemm, MatMulInteger, QLinearMatMul and Einsum.
//!
//! Every float product goes through `gemm` (and its f32 shorthand `sgemm`), the single entry point to
//! the `gemm` crate, so it can later be swapped for our own prepacked kernels without touching the
//! ops. Integer products use a plain row-parallel loop with exact (wrapping) integer arithmetic.

use half::{bf16, f16};
use kiln_runtime::{DType, Elem, Error, Result, Tensor};
use rayon::prelude::*;

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{broadcast_shapes, broadcast_strides, strides};

pub fn register(r: &mut Registry) {
    r.add("MatMul", matmul);
    r.add("Gemm", gemm_op);
    r.add("MatMulInteger", matmul_integer);
    r.add("QLinearMatMul", qlinear_matmul);
    r.add("Einsum", einsum);
}

/// Bind `$T` to a `MatElem` type for a numeric dtype other than f16/bf16.
macro_rules! with_mat_elem {
    ($dtype:expr, $T:ident, $body:block) => {
        match $dtype {
            DType::F32 => { type $T = f32; $body }
            DType::F64 => { type $T = f64; $body }
            DType::I8 => { type $T = i8; $body }
            DType::I16 => { type $T = i16; $body }
            DType::I32 => { type $T = i32; $body }
            DType::I64 => { type $T = i64; $body }
            DType::U8 => { type $T = u8; $body }
            DType::U16 => { type $T = u16; $body }
            DType::U32 => { type $T = u32; $body }
            DType::U64 => { type $T = u64; $body }
            d => return Err(Error::DType(format!("unsupported dtype {d}"))),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The GEMM entry point
// ---------------------------------------------------------------------------------------------

/// A strided matrix operand: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major matrix with leading dimension `ld`.
    pub fn rows(data: &'a [T], ld: usize) -> Self {
        Mat { data, rs: ld, cs: 1 }
    }

    /// The transpose of a row-major matrix with leading dimension `ld`.
    pub fn cols(data: &'a [T], ld: usize) -> Self {
        Mat { data, rs: 1, cs: ld }
    }

    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// Element types kernels multiply matrices of. Integer arithmetic wraps (ONNX/numpy semantics).
pub(crate) trait MatElem: Elem {
    const ZERO: Self;
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;

    /// `c = a × b` (or `c += a × b` if `acc`), `c` row-major with leading dimension `ldc`.
    /// Operand bounds have been checked by `gemm`.
    #[allow(clippy::too_many_arguments)]
    fn product(m: usize, n: usize, k: usize, a: Mat<Self>, b: Mat<Self>, acc: bool, c: &mut [Self], ldc: usize, par: bool) {
        naive_product(m, n, k, a, b, acc, c, ldc, par)
    }
}

macro_rules! int_mat_elem {
    ($($t:ty),*) => {$(
        impl MatElem for $t {
            const ZERO: Self = 0;
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
        }
    )*};
}
int_mat_elem!(i8, i16, i32, i64, u8, u16, u32, u64);

macro_rules! float_mat_elem {
    ($($t:ty),*) => {$(
        impl MatElem for $t {
            const ZERO: Self = 0.0;
            fn add(self, o: Self) -> Self { self + o }
            fn mul(self, o: Self) -> Self { self * o }
            #[allow(clippy::too_many_arguments)]
            fn product(m: usize, n: usize, k: usize, a: Mat<Self>, b: Mat<Self>, acc: bool, c: &mut [Self], ldc: usize, par: bool) {
                crate_gemm(m, n, k, 1.0, a, b, acc, c, ldc, par)
            }
        }
    )*};
}
float_mat_elem!(f32, f64);

/// The reference triple loop (i-k-j order so the inner loop streams rows of `b` and `c`).
#[allow(clippy::too_many_arguments)]
fn naive_product<T: MatElem>(m: usize, n: usize, k: usize, a: Mat<T>, b: Mat<T>, acc: bool, c: &mut [T], ldc: usize, par: bool) {
    let row = |i: usize, crow: &mut [T]| {
        let crow = &mut crow[..n];
        if !acc {
            crow.fill(T::ZERO);
        }
        for kk in 0..k {
            let av = a.data[i * a.rs + kk * a.cs];
            let boff = kk * b.rs;
            if b.cs == 1 {
                let brow = &b.data[boff..boff + n];
                for (cv, &bv) in crow.iter_mut().zip(brow) {
                    *cv = cv.add(av.mul(bv));
                }
            } else {
                for (j, cv) in crow.iter_mut().enumerate() {
                    *cv = cv.add(av.mul(b.data[boff + j * b.cs]));
                }
            }
        }
    };
    let c = &mut c[..(m - 1) * ldc + n];
    if par && m > 1 && m * n * k >= 1 << 16 && crate::cpu::par::threads() > 1 {
        c.par_chunks_mut(ldc).enumerate().for_each(|(i, r)| row(i, r));
    } else {
        c.chunks_mut(ldc).enumerate().for_each(|(i, r)| row(i, r));
    }
}

/// The one call into the `gemm` crate: `c = alpha·a·b` (`c += alpha·a·b` if `acc`).
#[allow(clippy::too_many_arguments)]
fn crate_gemm<T: 'static + Copy>(m: usize, n: usize, k: usize, alpha: T, a: Mat<T>, b: Mat<T>, acc: bool, c: &mut [T], ldc: usize, par: bool) {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // f32 goes to our packed SIMD GEMM (crate::cpu::gemm); f64 stays on the gemm crate for now.
        use crate::cpu::gemm::{sgemm, BRef, Epilogue, MatRef};
        // SAFETY: T is f32 (checked above), so these are the same memory with the same type.
        let (a32, b32, c32, alpha32) = unsafe {
            let cast = |s: &[T]| std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len());
            (
                MatRef::new(cast(a.data), a.rs, a.cs),
                MatRef::new(cast(b.data), b.rs, b.cs),
                std::slice::from_raw_parts_mut(c.as_mut_ptr() as *mut f32, c.len()),
                *(&alpha as *const T as *const f32),
            )
        };
        let epi = Epilogue { alpha: alpha32, ..Epilogue::NONE };
        sgemm(m, n, k, a32, BRef::Mat(b32), c32, ldc, acc, &epi, par).expect("operands checked by the callers");
        return;
    }
    let one: T = unsafe { one_of::<T>() };
    let par = if par && crate::cpu::par::threads() > 1 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: `gemm` checked that every operand index lies inside its slice; T is f32 or f64.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            one,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

/// 1 as a T known to be f32 or f64.
unsafe fn one_of<T: 'static + Copy>() -> T {
    use std::any::TypeId;
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        *(&1f32 as *const f32 as *const T)
    } else {
        *(&1f64 as *const f64 as *const T)
    }
}

/// `c = a × b` (`c += a × b` if `acc`) for an m×k `a`, k×n `b` and m×n `c` with leading dimension
/// `ldc`. `par` lets the product use the rayon pool (pass false when already inside a parallel loop).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: MatElem>(m: usize, n: usize, k: usize, a: Mat<T>, b: Mat<T>, acc: bool, c: &mut [T], ldc: usize, par: bool) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if !a.fits(m, k) || !b.fits(k, n) || ldc < n || c.len() < (m - 1) * ldc + n {
        return Err(Error::Other(format!("gemm operands too small for {m}x{k} · {k}x{n}")));
    }
    if k == 0 {
        if !acc {
            for r in c.chunks_mut(ldc).take(m) {
                r[..n].fill(T::ZERO);
            }
        }
        return Ok(());
    }
    T::product(m, n, k, a, b, acc, c, ldc, par);
    Ok(())
}

/// The f32 GEMM used by Conv and friends: `c = a × b` (`c += a × b` if `acc`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(m: usize, n: usize, k: usize, a: Mat<f32>, b: Mat<f32>, acc: bool, c: &mut [f32], ldc: usize, par: bool) -> Result<()> {
    gemm(m, n, k, a, b, acc, c, ldc, par)
}

/// `c = alpha·a·b (+ c if acc)` for floats, the integer path scaling afterwards.
#[allow(clippy::too_many_arguments)]
fn gemm_alpha<T: MatElem>(m: usize, n: usize, k: usize, alpha: T, a: Mat<T>, b: Mat<T>, acc: bool, c: &mut [T], ldc: usize) -> Result<()> {
    use std::any::TypeId;
    let id = TypeId::of::<T>();
    if (id == TypeId::of::<f32>() || id == TypeId::of::<f64>()) && m > 0 && n > 0 && k > 0 {
        if !a.fits(m, k) || !b.fits(k, n) || ldc < n || c.len() < (m - 1) * ldc + n {
            return Err(Error::Other(format!("gemm operands too small for {m}x{k} · {k}x{n}")));
        }
        crate_gemm(m, n, k, alpha, a, b, acc, c, ldc, true);
        return Ok(());
    }
    if !acc {
        gemm(m, n, k, a, b, false, c, ldc, true)?;
        for r in c.chunks_mut(ldc).take(m) {
            for v in &mut r[..n] {
                *v = v.mul(alpha);
            }
        }
        return Ok(());
    }
    let mut tmp = vec![T::ZERO; m * n];
    gemm(m, n, k, a, b, false, &mut tmp, n, true)?;
    for (r, t) in c.chunks_mut(ldc).zip(tmp.chunks(n)) {
        for (v, &x) in r[..n].iter_mut().zip(t) {
            *v = v.add(x.mul(alpha));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// MatMul (numpy semantics)
// ---------------------------------------------------------------------------------------------

/// How a numpy-style matmul of two shapes runs: per batch element, offsets into A and B.
struct MatMulPlan {
    out_shape: Vec<usize>,
    m: usize,
    n: usize,
    k: usize,
    a_off: Vec<usize>,
    b_off: Vec<usize>,
    /// Batch dims of A only (B is one matrix): the batch folds into M and one product does it all.
    fold: bool,
}

fn matmul_plan(a: &[usize], b: &[usize]) -> Result<MatMulPlan> {
    if a.is_empty() || b.is_empty() {
        return Err(Error::Shape("MatMul inputs must have rank >= 1".into()));
    }
    let a2: Vec<usize> = if a.len() == 1 { vec![1, a[0]] } else { a.to_vec() };
    let b2: Vec<usize> = if b.len() == 1 { vec![b[0], 1] } else { b.to_vec() };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(Error::Shape(format!("MatMul shapes {a:?} and {b:?} do not align")));
    }
    let ab = &a2[..a2.len() - 2];
    let bb = &b2[..b2.len() - 2];
    let batch_shape = broadcast_shapes(&[ab, bb])?;
    let mut out_shape = batch_shape.clone();
    if a.len() > 1 {
        out_shape.push(m);
    }
    if b.len() > 1 {
        out_shape.push(n);
    }
    let nb: usize = batch_shape.iter().product();
    let fold = bb.iter().all(|&d| d == 1) && ab == batch_shape.as_slice();
    let (a_off, b_off) = if fold {
        (vec![0], vec![0])
    } else {
        let sa = broadcast_strides(ab, &batch_shape);
        let sb = broadcast_strides(bb, &batch_shape);
        let bst = strides(&batch_shape);
        let mut ao = Vec::with_capacity(nb);
        let mut bo = Vec::with_capacity(nb);
        for bi in 0..nb {
            let (mut oa, mut ob) = (0, 0);
            for d in 0..batch_shape.len() {
                let idx = bi / bst[d] % batch_shape[d];
                oa += idx * sa[d];
                ob += idx * sb[d];
            }
            ao.push(oa * m * k);
            bo.push(ob * k * n);
        }
        (ao, bo)
    };
    Ok(MatMulPlan { out_shape, m, n, k, a_off, b_off, fold })
}

/// Run a plan over contiguous operands into a fresh output.
fn run_plan<T: MatElem>(p: &MatMulPlan, a: &[T], b: &[T]) -> Result<Vec<T>> {
    let (m, n, k) = (p.m, p.n, p.k);
    let total: usize = p.out_shape.iter().product();
    let mut out = vec![T::ZERO; total];
    if total == 0 {
        return Ok(out);
    }
    if p.fold {
        let rows = total / n;
        gemm(rows, n, k, Mat::rows(a, k), Mat::rows(b, n), false, &mut out, n, true)?;
        return Ok(out);
    }
    let nb = p.a_off.len();
    let one = |bi: usize, c: &mut [T], par: bool| -> Result<()> {
        let a = a.get(p.a_off[bi]..p.a_off[bi] + m * k).ok_or_else(|| Error::Shape("MatMul: A too small".into()))?;
        let b = b.get(p.b_off[bi]..p.b_off[bi] + k * n).ok_or_else(|| Error::Shape("MatMul: B too small".into()))?;
        gemm(m, n, k, Mat::rows(a, k), Mat::rows(b, n), false, c, n, par)
    };
    // Many small products: one per task. Few large ones: let each use the whole pool.
    if nb > 1 && m * n * k < 1 << 21 && crate::cpu::par::threads() > 1 {
        out.par_chunks_mut(m * n).enumerate().try_for_each(|(bi, c)| one(bi, c, false))?;
    } else {
        for (bi, c) in out.chunks_mut(m * n).enumerate() {
            one(bi, c, true)?;
        }
    }
    Ok(out)
}

fn matmul(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.input(inputs, 0)?;
    let b = ctx.input(inputs, 1)?;
    if a.dtype() != b.dtype() {
        return Err(Error::DType(format!("MatMul of {} and {}", a.dtype(), b.dtype())));
    }
    let p = matmul_plan(a.shape(), b.shape())?;
    let t = match a.dtype() {
        DType::F16 | DType::BF16 => {
            let out = run_plan(&p, &widen(a)?, &widen(b)?)?;
            narrow(a.dtype(), &p.out_shape, &out)?
        }
        dt => with_mat_elem!(dt, T, { Tensor::from_vec(&p.out_shape, run_plan(&p, a.view::<T>()?, b.view::<T>()?)?)? }),
    };
    Ok(vec![t])
}


/// f16/bf16 elements as f32.
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
// Gemm
// ---------------------------------------------------------------------------------------------

fn gemm_op(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.input(inputs, 0)?;
    let b = ctx.input(inputs, 1)?;
    let c = ctx.opt_input(inputs, 2);
    if a.rank() != 2 || b.rank() != 2 {
        return Err(Error::Shape(format!("Gemm needs 2-D A and B, got {:?} and {:?}", a.shape(), b.shape())));
    }
    let ta = ctx.attr_i("transA", 0) != 0;
    let tb = ctx.attr_i("transB", 0) != 0;
    let alpha = ctx.attr_f("alpha", 1.0);
    let beta = ctx.attr_f("beta", 1.0);
    let (m, k) = if ta { (a.shape()[1], a.shape()[0]) } else { (a.shape()[0], a.shape()[1]) };
    let (k2, n) = if tb { (b.shape()[1], b.shape()[0]) } else { (b.shape()[0], b.shape()[1]) };
    if k != k2 {
        return Err(Error::Shape(format!("Gemm: A {:?} and B {:?} do not align", a.shape(), b.shape())));
    }
    let g = GemmArgs { m, n, k, ta, tb, alpha: alpha as f64, beta: beta as f64 };
    let out = match a.dtype() {
        DType::F16 | DType::BF16 => {
            let cv = c.map(widen).transpose()?;
            let y = g.run::<f32>(&widen(a)?, &widen(b)?, cv.as_deref().zip(c.map(|c| c.shape())))?;
            narrow(a.dtype(), &[m, n], &y)?
        }
        dt => with_mat_elem!(dt, T, {
            let cv = match c {
                Some(c) => Some((c.view::<T>()?, c.shape())),
                None => None,
            };
            Tensor::from_vec(&[m, n], g.run::<T>(a.view::<T>()?, b.view::<T>()?, cv)?)?
        }),
    };
    Ok(vec![out])
}

struct GemmArgs {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    alpha: f64,
    beta: f64,
}

impl GemmArgs {
    fn run<T: MatElem + FromF64>(&self, a: &[T], b: &[T], c: Option<(&[T], &[usize])>) -> Result<Vec<T>> {
        let (m, n, k) = (self.m, self.n, self.k);
        let mut y = vec![T::ZERO; m * n];
        let mut acc = false;
        if let Some((cv, cshape)) = c.filter(|_| self.beta != 0.0) {
            if cshape.len() > 2 {
                return Err(Error::Shape(format!("Gemm: C of shape {cshape:?} has rank > 2")));
            }
            let off = 2 - cshape.len();
            for (i, &d) in cshape.iter().enumerate() {
                let want = [m, n][off + i];
                if d != 1 && d != want {
                    return Err(Error::Shape(format!("Gemm: C {cshape:?} does not broadcast to [{m}, {n}]")));
                }
            }
            let cs = broadcast_strides(cshape, &[m, n]);
            let beta = T::from_f64(self.beta);
            for i in 0..m {
                for j in 0..n {
                    y[i * n + j] = cv[i * cs[0] + j * cs[1]].mul(beta);
                }
            }
            acc = true;
        }
        let am = if self.ta { Mat::cols(a, m) } else { Mat::rows(a, k) };
        let bm = if self.tb { Mat::cols(b, k) } else { Mat::rows(b, n) };
        gemm_alpha(m, n, k, T::from_f64(self.alpha), am, bm, acc, &mut y, n)?;
        Ok(y)
    }
}

/// Conversion of a float attribute (alpha, beta) into the element type.
trait FromF64 {
    fn from_f64(v: f64) -> Self;
}
macro_rules! from_f64 {
    ($($t:ty),*) => {$( impl FromF64 for $t { fn from_f64(v: f64) -> Self { v as $t } } )*};
}
from_f64!(f32, f64, i8, i16, i32, i64, u8, u16, u32, u64);

// ---------------------------------------------------------------------------------------------
// MatMulInteger, QLinearMatMul
// ---------------------------------------------------------------------------------------------

/// u8/i8 (or int4/uint4) elements widened to i32.
fn int_vals(t: &Tensor) -> Result<Vec<i32>> {
    Ok(match t.dtype() {
        DType::U8 | DType::U4 => t.view::<u8>()?.iter().map(|&x| x as i32).collect(),
        DType::I8 | DType::I4 => t.view::<i8>()?.iter().map(|&x| x as i32).collect(),
        d => return Err(Error::DType(format!("expected an 8-bit integer tensor, got {d}"))),
    })
}

/// Subtract a zero point given per tensor, per row (`per_row`: zero point varies along dim -2) or per
/// column (along dim -1), possibly with leading batch dims.
fn sub_zero_point(v: &mut [i32], shape: &[usize], zp: Option<&Tensor>, per_row: bool) -> Result<()> {
    let Some(zp) = zp else { return Ok(()) };
    let z = int_vals(zp)?;
    if z.len() == 1 {
        v.iter_mut().for_each(|x| *x -= z[0]);
        return Ok(());
    }
    let r = shape.len();
    let (rows, cols) = match r {
        0 => (1, 1),
        1 => (1, shape[0]),
        _ => (shape[r - 2], shape[r - 1]),
    };
    // When A is a vector, its "rows" are its single row; B vectors are a single column.
    let (rows, cols) = if r == 1 && !per_row { (shape[0], 1) } else { (rows, cols) };
    let per = if per_row { rows } else { cols };
    if per == 0 || z.len() % per != 0 || !v.len().is_multiple_of((rows * cols).max(1)) {
        return Err(Error::Shape(format!("zero point of {} elements does not fit shape {shape:?}", z.len())));
    }
    let zbatches = z.len() / per;
    let nmat = v.len() / (rows * cols).max(1);
    if zbatches != 1 && zbatches != nmat {
        return Err(Error::Shape(format!("zero point of {} elements does not fit shape {shape:?}", z.len())));
    }
    for (bi, mat) in v.chunks_mut(rows * cols).enumerate() {
        let zb = &z[(bi % zbatches) * per..][..per];
        for (i, x) in mat.iter_mut().enumerate() {
            let idx = if per_row { i / cols } else { i % cols };
            *x -= zb[idx];
        }
    }
    Ok(())
}

/// The exact i32 product of two zero-point-adjusted 8-bit operands.
fn int_product(a: &Tensor, b: &Tensor, za: Option<&Tensor>, zb: Option<&Tensor>) -> Result<(MatMulPlan, Vec<i32>)> {
    let p = matmul_plan(a.shape(), b.shape())?;
    let mut av = int_vals(a)?;
    let mut bv = int_vals(b)?;
    sub_zero_point(&mut av, a.shape(), za, true)?;
    sub_zero_point(&mut bv, b.shape(), zb, false)?;
    let out = run_plan(&p, &av, &bv)?;
    Ok((p, out))
}

fn matmul_integer(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.input(inputs, 0)?;
    let b = ctx.input(inputs, 1)?;
    let (p, out) = int_product(a, b, ctx.opt_input(inputs, 2), ctx.opt_input(inputs, 3))?;
    Ok(vec![Tensor::from_vec(&p.out_shape, out)?])
}

/// Scale values as f32 plus whether they are f16 (whose arithmetic we reproduce by rounding).
fn scale_vals(t: &Tensor) -> Result<(Vec<f32>, bool)> {
    Ok(match t.dtype() {
        DType::F32 => (t.view::<f32>()?.to_vec(), false),
        DType::F16 => (t.view::<f16>()?.iter().map(|x| x.to_f32()).collect(), true),
        DType::BF16 => (t.view::<bf16>()?.iter().map(|x| x.to_f32()).collect(), false),
        d => return Err(Error::DType(format!("expected a float scale, got {d}"))),
    })
}

/// `a·b/c` computed in the scales' own precision (f32, or f16 rounding after each operation).
pub(crate) fn requant_multiplier(a: f32, b: f32, c: f32, half_prec: bool) -> f64 {
    if half_prec {
        let ab = f16::from_f32(a * b).to_f32();
        f16::from_f32(ab / c).to_f64()
    } else {
        (a * b / c) as f64
    }
}

/// Round half to even, add the zero point and saturate to the output type's range.
pub(crate) fn requantize(v: f64, zp: i32, lo: i32, hi: i32) -> i32 {
    let r = (v + zp as f64).round_ties_even();
    r.clamp(lo as f64, hi as f64) as i32
}

/// The [lo, hi] range of a quantized dtype.
pub(crate) fn quant_range(dtype: DType) -> Result<(i32, i32)> {
    Ok(match dtype {
        DType::U8 => (0, 255),
        DType::I8 => (-128, 127),
        DType::U4 => (0, 15),
        DType::I4 => (-8, 7),
        DType::U16 => (0, 65535),
        DType::I16 => (-32768, 32767),
        d => return Err(Error::DType(format!("unsupported quantized dtype {d}"))),
    })
}

/// A tensor of quantized `dtype` from already saturated values.
pub(crate) fn quant_tensor(dtype: DType, shape: &[usize], v: &[i32]) -> Result<Tensor> {
    match dtype {
        DType::U8 | DType::U4 => Tensor::from_slice_as(dtype, shape, &v.iter().map(|&x| x as u8).collect::<Vec<_>>()),
        DType::I8 | DType::I4 => Tensor::from_slice_as(dtype, shape, &v.iter().map(|&x| x as i8).collect::<Vec<_>>()),
        DType::U16 => Tensor::from_vec(shape, v.iter().map(|&x| x as u16).collect()),
        DType::I16 => Tensor::from_vec(shape, v.iter().map(|&x| x as i16).collect()),
        d => Err(Error::DType(format!("unsupported quantized dtype {d}"))),
    }
}

fn qlinear_matmul(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.input(inputs, 0)?;
    let (sa, half_a) = scale_vals(ctx.input(inputs, 1)?)?;
    let za = ctx.opt_input(inputs, 2);
    let b = ctx.input(inputs, 3)?;
    let (sb, _) = scale_vals(ctx.input(inputs, 4)?)?;
    let zb = ctx.opt_input(inputs, 5);
    let (sy, _) = scale_vals(ctx.input(inputs, 6)?)?;
    let zy = ctx.opt_input(inputs, 7);
    let out_dtype = zy.map_or(a.dtype(), |z| z.dtype());
    let (lo, hi) = quant_range(out_dtype)?;
    let zyv = match zy {
        Some(z) => *int_vals(z)?.first().ok_or_else(|| Error::Shape("empty y_zero_point".into()))?,
        None => 0,
    };
    if sy.len() != 1 {
        return Err(ctx.unsupported("y_scale must be a scalar"));
    }
    let (p, acc) = int_product(a, b, za, zb)?;
    let (m, n) = (p.m, p.n);
    // Per-row scales of A vary along the output's M axis, per-column scales of B along N.
    let ms: Vec<f64> = (0..m * n)
        .map(|idx| {
            let av = if sa.len() == 1 { sa[0] } else { sa[(idx / n) % sa.len()] };
            let bv = if sb.len() == 1 { sb[0] } else { sb[(idx % n) % sb.len()] };
            requant_multiplier(av, bv, sy[0], half_a)
        })
        .collect();
    if (sa.len() != 1 && sa.len() != m) || (sb.len() != 1 && sb.len() != n) {
        return Err(ctx.unsupported("scales must be per tensor, per row of A or per column of B"));
    }
    let y: Vec<i32> = acc
        .iter()
        .enumerate()
        .map(|(i, &v)| requantize(v as f64 * ms[i % (m * n)], zyv, lo, hi))
        .collect();
    Ok(vec![quant_tensor(out_dtype, &p.out_shape, &y)?])
}

// ---------------------------------------------------------------------------------------------
// Einsum
// ---------------------------------------------------------------------------------------------

/// A contiguous operand whose axes carry distinct labels.
struct Labeled<T> {
    data: Vec<T>,
    labels: Vec<u32>,
    shape: Vec<usize>,
}

/// Copy the strided view (`shape`, `st` element strides from `base`) into a contiguous vector.
fn gather<T: Copy>(src: &[T], shape: &[usize], st: &[usize]) -> Vec<T> {
    let total: usize = shape.iter().product();
    let mut out = Vec::with_capacity(total);
    if total == 0 {
        return out;
    }
    if shape.is_empty() {
        out.push(src[0]);
        return out;
    }
    let r = shape.len();
    let (inner, ist) = (shape[r - 1], st[r - 1]);
    let mut idx = vec![0usize; r - 1];
    loop {
        let base: usize = idx.iter().zip(st).map(|(i, s)| i * s).sum();
        if ist == 1 {
            out.extend_from_slice(&src[base..base + inner]);
        } else {
            out.extend((0..inner).map(|j| src[base + j * ist]));
        }
        let mut d = r - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

impl<T: MatElem> Labeled<T> {
    /// Reorder axes so labels come in `order` (a permutation of `self.labels`).
    fn permute(self, order: &[u32]) -> Labeled<T> {
        if order == self.labels.as_slice() {
            return self;
        }
        let st = strides(&self.shape);
        let pos: Vec<usize> = order.iter().map(|l| self.labels.iter().position(|x| x == l).unwrap()).collect();
        let shape: Vec<usize> = pos.iter().map(|&p| self.shape[p]).collect();
        let pst: Vec<usize> = pos.iter().map(|&p| st[p]).collect();
        Labeled { data: gather(&self.data, &shape, &pst), labels: order.to_vec(), shape }
    }

    /// Sum out every axis whose label is not in `keep`.
    fn reduce(self, keep: &dyn Fn(u32) -> bool) -> Labeled<T> {
        if self.labels.iter().all(|&l| keep(l)) {
            return self;
        }
        let kept: Vec<u32> = self.labels.iter().copied().filter(|&l| keep(l)).collect();
        let gone: Vec<u32> = self.labels.iter().copied().filter(|&l| !keep(l)).collect();
        let order: Vec<u32> = kept.iter().chain(&gone).copied().collect();
        let p = self.permute(&order);
        let nk = kept.len();
        let outer: usize = p.shape[..nk].iter().product();
        let inner: usize = p.shape[nk..].iter().product();
        let data: Vec<T> = (0..outer)
            .map(|o| p.data[o * inner..(o + 1) * inner].iter().fold(T::ZERO, |s, &x| s.add(x)))
            .collect();
        Labeled { data, labels: kept, shape: p.shape[..nk].to_vec() }
    }
}

/// Contract two operands, keeping the labels `keep` accepts (shared labels not kept are summed).
fn contract<T: MatElem>(a: Labeled<T>, b: Labeled<T>, keep: &dyn Fn(u32) -> bool) -> Result<Labeled<T>> {
    let in_b = |l: u32| b.labels.contains(&l);
    let in_a = |l: u32| a.labels.contains(&l);
    let batch: Vec<u32> = a.labels.iter().copied().filter(|&l| in_b(l) && keep(l)).collect();
    let ks: Vec<u32> = a.labels.iter().copied().filter(|&l| in_b(l) && !keep(l)).collect();
    let ms: Vec<u32> = a.labels.iter().copied().filter(|&l| !in_b(l)).collect();
    let ns: Vec<u32> = b.labels.iter().copied().filter(|&l| !in_a(l)).collect();
    let size = |lab: &Labeled<T>, ls: &[u32]| -> usize {
        ls.iter().map(|l| lab.shape[lab.labels.iter().position(|x| x == l).unwrap()]).product()
    };
    let (nb, m, k, n) = (size(&a, &batch), size(&a, &ms), size(&a, &ks), size(&b, &ns));
    if size(&b, &batch) != nb || size(&b, &ks) != k {
        return Err(Error::Shape("Einsum: operand dimensions do not match".into()));
    }
    let dims = |lab: &Labeled<T>, ls: &[u32]| -> Vec<usize> {
        ls.iter().map(|l| lab.shape[lab.labels.iter().position(|x| x == l).unwrap()]).collect()
    };
    let mut shape = dims(&a, &batch);
    shape.extend(dims(&a, &ms));
    shape.extend(dims(&b, &ns));
    let a_order: Vec<u32> = batch.iter().chain(&ms).chain(&ks).copied().collect();
    let b_order: Vec<u32> = batch.iter().chain(&ks).chain(&ns).copied().collect();
    let a = a.permute(&a_order);
    let b = b.permute(&b_order);
    let mut out = vec![T::ZERO; nb * m * n];
    if m * n > 0 {
        let few = nb > 1 && m * n * k < 1 << 21;
        let run = |bi: usize, c: &mut [T], par: bool| {
            let am = Mat::rows(&a.data[bi * m * k..], k);
            let bm = Mat::rows(&b.data[bi * k * n..], n);
            gemm(m, n, k, am, bm, false, c, n, par)
        };
        if few && crate::cpu::par::threads() > 1 {
            out.par_chunks_mut(m * n).enumerate().try_for_each(|(bi, c)| run(bi, c, false))?;
        } else {
            for (bi, c) in out.chunks_mut(m * n).enumerate() {
                run(bi, c, true)?;
            }
        }
    }
    let labels = batch.iter().chain(&ms).chain(&ns).copied().collect();
    Ok(Labeled { data: out, labels, shape })
}

/// A parsed einsum equation: per operand its axis labels; the output labels. Ellipsis dims get
/// labels from 1000 upwards (right-aligned, shared across operands).
struct Equation {
    inputs: Vec<Vec<u32>>,
    output: Vec<u32>,
}

fn parse_term(term: &str, rank: usize, ell_rank: usize) -> Result<Vec<u32>> {
    let bad = || Error::Other(format!("Einsum: bad term '{term}'"));
    let mut labels = Vec::new();
    let parts: Vec<&str> = term.split("...").collect();
    if parts.len() > 2 {
        return Err(bad());
    }
    let letters = |s: &str| -> Result<Vec<u32>> {
        s.chars().map(|c| if c.is_ascii_alphabetic() { Ok(c as u32) } else { Err(bad()) }).collect()
    };
    labels.extend(letters(parts[0])?);
    if parts.len() == 2 {
        let tail = letters(parts[1])?;
        let n_ell = rank.checked_sub(labels.len() + tail.len()).ok_or_else(bad)?;
        labels.extend((0..n_ell).map(|i| 1000 + (ell_rank - n_ell + i) as u32));
        labels.extend(tail);
    }
    if labels.len() != rank {
        return Err(Error::Shape(format!("Einsum: term '{term}' does not match an operand of rank {rank}")));
    }
    Ok(labels)
}

fn parse_equation(eq: &str, ranks: &[usize]) -> Result<Equation> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != ranks.len() {
        return Err(Error::Other(format!("Einsum: equation has {} operands, {} given", terms.len(), ranks.len())));
    }
    let ell_rank = terms
        .iter()
        .zip(ranks)
        .filter(|(t, _)| t.contains("..."))
        .map(|(t, &r)| r.saturating_sub(t.chars().filter(|c| c.is_ascii_alphabetic()).count()))
        .max()
        .unwrap_or(0);
    let inputs = terms
        .iter()
        .zip(ranks)
        .map(|(t, &r)| parse_term(t, r, ell_rank))
        .collect::<Result<Vec<_>>>()?;
    let output = match rhs {
        Some(r) => {
            let mut out = Vec::new();
            let parts: Vec<&str> = r.split("...").collect();
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    out.extend((0..ell_rank).map(|e| 1000 + e as u32));
                }
                out.extend(p.chars().map(|c| c as u32));
            }
            out
        }
        None => {
            let mut count = std::collections::BTreeMap::new();
            for l in inputs.iter().flatten().filter(|&&l| l < 1000) {
                *count.entry(*l).or_insert(0) += 1;
            }
            let mut out: Vec<u32> = (0..ell_rank).map(|e| 1000 + e as u32).collect();
            out.extend(count.into_iter().filter(|&(_, c)| c == 1).map(|(l, _)| l));
            out
        }
    };
    Ok(Equation { inputs, output })
}

fn einsum(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let eq = ctx.attr_s("equation", "");
    let ts: Vec<&Tensor> = inputs.iter().flatten().collect();
    if ts.is_empty() {
        return Err(Error::Other("Einsum needs at least one input".into()));
    }
    let dt = ts[0].dtype();
    if ts.iter().any(|t| t.dtype() != dt) {
        return Err(Error::DType("Einsum inputs differ in dtype".into()));
    }
    let ranks: Vec<usize> = ts.iter().map(|t| t.rank()).collect();
    let e = parse_equation(&eq, &ranks)?;
    let t = match dt {
        DType::F16 | DType::BF16 => {
            let vals = ts.iter().map(|t| widen(t)).collect::<Result<Vec<_>>>()?;
            let (shape, out) = einsum_run::<f32>(&e, &ts, vals.iter().map(|v| v.as_slice()).collect())?;
            narrow(dt, &shape, &out)?
        }
        dt => with_mat_elem!(dt, T, {
            let vals = ts.iter().map(|t| t.view::<T>()).collect::<Result<Vec<_>>>()?;
            let (shape, out) = einsum_run::<T>(&e, &ts, vals)?;
            Tensor::from_vec(&shape, out)?
        }),
    };
    Ok(vec![t])
}

fn einsum_run<T: MatElem>(e: &Equation, ts: &[&Tensor], vals: Vec<&[T]>) -> Result<(Vec<usize>, Vec<T>)> {
    // Every label's size; ellipsis dims may broadcast from 1.
    let mut sizes: std::collections::HashMap<u32, usize> = Default::default();
    for (labels, t) in e.inputs.iter().zip(ts) {
        for (&l, &d) in labels.iter().zip(t.shape()) {
            let s = sizes.entry(l).or_insert(d);
            if *s == 1 {
                *s = d;
            } else if d != *s && d != 1 {
                return Err(Error::Shape(format!("Einsum: label size mismatch ({d} vs {s})")));
            }
        }
    }
    for l in &e.output {
        if !sizes.contains_key(l) {
            return Err(Error::Other("Einsum: output label not found in the inputs".into()));
        }
    }
    // Take diagonals of repeated labels and broadcast size-1 ellipsis dims, making labels unique.
    let mut ops: Vec<Labeled<T>> = Vec::new();
    for ((labels, t), v) in e.inputs.iter().zip(ts).zip(vals) {
        let st = strides(t.shape());
        let mut ul: Vec<u32> = Vec::new();
        let mut ust: Vec<usize> = Vec::new();
        for (i, &l) in labels.iter().enumerate() {
            let s = if t.shape()[i] == 1 { 0 } else { st[i] };
            match ul.iter().position(|&x| x == l) {
                Some(p) => ust[p] += s,
                None => {
                    ul.push(l);
                    ust.push(s);
                }
            }
        }
        let shape: Vec<usize> = ul.iter().map(|l| sizes[l]).collect();
        let data = if shape.iter().product::<usize>() == 0 { Vec::new() } else { gather(v, &shape, &ust) };
        ops.push(Labeled { data, labels: ul, shape });
    }
    // Contract left to right, keeping only labels the output or a later operand needs.
    let needed_after = |i: usize, l: u32| -> bool { e.output.contains(&l) || ops_labels_after(&e.inputs, i, l) };
    let mut iter = ops.into_iter().enumerate();
    let (_, first) = iter.next().unwrap();
    let mut cur = first.reduce(&|l| needed_after(0, l));
    for (i, op) in iter {
        let cur_labels = cur.labels.clone();
        let op = op.reduce(&|l| needed_after(i, l) || cur_labels.contains(&l));
        let keep = |l: u32| needed_after(i, l);
        cur = contract(cur, op, &keep)?;
    }
    let cur = cur.reduce(&|l| e.output.contains(&l));
    let mut out_labels = e.output.clone();
    out_labels.dedup();
    if out_labels.len() != e.output.len() || cur.labels.len() != out_labels.len() {
        return Err(Error::Other("Einsum: repeated output label".into()));
    }
    let cur = cur.permute(&out_labels);
    Ok((cur.shape, cur.data))
}

fn ops_labels_after(inputs: &[Vec<u32>], i: usize, l: u32) -> bool {
    inputs[i + 1..].iter().any(|ls| ls.contains(&l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    fn step(op: &str, attrs: Vec<Attr>) -> Step {
        Step { op: op.into(), opset: 17, outputs: vec![0], attrs, ..Default::default() }
    }

    fn run(op: &str, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Vec<Tensor> {
        crate::cpu::eval_step(&step(op, attrs), &inputs).unwrap()
    }

    fn f32s(v: &[f32], shape: &[usize]) -> Option<Tensor> {
        Some(Tensor::from_vec(shape, v.to_vec()).unwrap())
    }

    #[test]
    fn matmul_batched_and_vector() {
        // [2,1,2] x [2] -> [2,1]
        let y = run("MatMul", vec![], vec![f32s(&[1., 2., 3., 4.], &[2, 1, 2]), f32s(&[10., 1.], &[2])]);
        assert_eq!(y[0].shape(), &[2, 1]);
        assert_eq!(y[0].view::<f32>().unwrap(), &[12., 34.]);
        // broadcast batch: [2,2,2] x [1,2,1]
        let y = run("MatMul", vec![], vec![f32s(&[1., 2., 3., 4., 5., 6., 7., 8.], &[2, 2, 2]), f32s(&[1., 1.], &[1, 2, 1])]);
        assert_eq!(y[0].view::<f32>().unwrap(), &[3., 7., 11., 15.]);
        let ints = run("MatMul", vec![], vec![Some(Tensor::from_vec(&[1, 2], vec![2i64, 3]).unwrap()), Some(Tensor::from_vec(&[2, 1], vec![4i64, 5]).unwrap())]);
        assert_eq!(ints[0].view::<i64>().unwrap(), &[23]);
    }

    #[test]
    fn gemm_trans_alpha_beta() {
        let a = Attr { name: "transA".into(), kind: AttrKind::Int as i32, i: 1, ..Default::default() };
        let al = Attr { name: "alpha".into(), kind: AttrKind::Float as i32, f: 2.0, ..Default::default() };
        let be = Attr { name: "beta".into(), kind: AttrKind::Float as i32, f: 0.5, ..Default::default() };
        // A^T = [[1,3],[2,4]]; B = I; C = [10, 20] broadcast over rows.
        let y = run("Gemm", vec![a, al, be], vec![f32s(&[1., 2., 3., 4.], &[2, 2]), f32s(&[1., 0., 0., 1.], &[2, 2]), f32s(&[10., 20.], &[2])]);
        assert_eq!(y[0].view::<f32>().unwrap(), &[7., 16., 9., 18.]);
    }

    #[test]
    fn einsum_forms() {
        let eqa = |s: &str| Attr { name: "equation".into(), kind: AttrKind::String as i32, s: s.as_bytes().to_vec(), ..Default::default() };
        let m = f32s(&[1., 2., 3., 4.], &[2, 2]);
        assert_eq!(run("Einsum", vec![eqa("ii")], vec![m.clone()])[0].view::<f32>().unwrap(), &[5.]);
        assert_eq!(run("Einsum", vec![eqa("ij->ji")], vec![m.clone()])[0].view::<f32>().unwrap(), &[1., 3., 2., 4.]);
        assert_eq!(run("Einsum", vec![eqa("ij,jk")], vec![m.clone(), m.clone()])[0].view::<f32>().unwrap(), &[7., 10., 15., 22.]);
        assert_eq!(run("Einsum", vec![eqa("...j,...j->...")], vec![m.clone(), m.clone()])[0].view::<f32>().unwrap(), &[5., 25.]);
        assert_eq!(run("Einsum", vec![eqa("ij->")], vec![m])[0].view::<f32>().unwrap(), &[10.]);
    }

    #[test]
    fn integer_products() {
        let a = Tensor::from_vec(&[1, 2], vec![3u8, 4]).unwrap();
        let b = Tensor::from_vec(&[2, 1], vec![5u8, 6]).unwrap();
        let za = Tensor::scalar(1u8);
        let y = run("MatMulInteger", vec![], vec![Some(a), Some(b), Some(za), None]);
        assert_eq!(y[0].view::<i32>().unwrap(), &[2 * 5 + 3 * 6]);
        assert_eq!(requantize(2.5, 0, 0, 255), 2);
        assert_eq!(requantize(3.5, 0, 0, 255), 4);
        assert_eq!(requantize(-300.0, 0, -128, 127), -128);
    }
}
