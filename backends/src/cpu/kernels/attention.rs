//! `kiln.Attention`: softmax(scale·Q·Kᵀ + mask)·V in one kernel, produced by the `attention`
//! fusion pass from the MatMul → scale → Add → Softmax → MatMul chain exporters emit.
//!
//! Inputs Q, K, V (f32, rank 4) and an optional additive mask. Each input is read through a
//! permutation (`q_perm`, `k_perm`, `v_perm`, default identity): the logical tensor is
//! `Transpose(input, perm)`, so the head-splitting Transposes in front of attention cost nothing.
//! Logically Q is [B, H, Sq, D], K is [B, H, Sk, D] (not transposed), V is [B, H, Sk, Dv]; B and H
//! broadcast as MatMul's batch dims do. The mask broadcasts to [B, H, Sq, Sk]. The result is the
//! logical [B, H, Sq, Dv] stored as `Transpose(result, out_perm)`.
//!
//! Work is split over (batch, head, block of query rows); each task computes its score block with
//! the packed GEMM (transposed, keys × queries), adds the mask, takes a numerically stable softmax
//! down the columns and multiplies by V, so the full [B, H, Sq, Sk] score tensor never exists.

use rayon::prelude::*;

use kiln_runtime::{DType, Error, Result, Tensor};

use super::unary::with_isa;
use crate::cpu::ctx::OpCtx;
use crate::cpu::gemm::{self, BRef, Epilogue, MatRef};
use crate::cpu::registry::Registry;
use crate::cpu::util::{broadcast_strides, strides};

pub fn register(r: &mut Registry) {
    r.add_in("kiln", "Attention", attention);
}

/// Score elements per task block: the block stays in L2 between the two products.
const BLOCK_ELEMS: usize = 1 << 14;

/// A rank-4 input seen through its permutation: logical dims and their element strides.
#[derive(Clone, Copy, Debug)]
struct View {
    dims: [usize; 4],
    strides: [usize; 4],
}

fn perm_attr(ctx: &OpCtx, name: &str) -> Result<[usize; 4]> {
    let Some(p) = ctx.attr_ints(name) else { return Ok([0, 1, 2, 3]) };
    let mut out = [0usize; 4];
    let mut seen = [false; 4];
    if p.len() != 4 {
        return Err(Error::Shape(format!("Attention: {name} {p:?} is not a permutation of 4 axes")));
    }
    for (o, &a) in out.iter_mut().zip(&p) {
        if !(0..4).contains(&a) || seen[a as usize] {
            return Err(Error::Shape(format!("Attention: {name} {p:?} is not a permutation of 4 axes")));
        }
        seen[a as usize] = true;
        *o = a as usize;
    }
    Ok(out)
}

fn view(t: &Tensor, perm: [usize; 4], what: &str) -> Result<View> {
    if t.dtype() != DType::F32 {
        return Err(Error::DType(format!("Attention: {what} is {}, expected f32", t.dtype())));
    }
    if t.rank() != 4 {
        return Err(Error::Shape(format!("Attention: {what} {:?} is not rank 4", t.shape())));
    }
    let st = strides(t.shape());
    let mut v = View { dims: [0; 4], strides: [0; 4] };
    for i in 0..4 {
        v.dims[i] = t.shape()[perm[i]];
        v.strides[i] = st[perm[i]];
    }
    Ok(v)
}

/// MatMul's broadcast of one batch dim over several operands.
fn batch_dim(ds: &[usize]) -> Result<usize> {
    let mut out = 1;
    for &d in ds {
        if d != 1 {
            if out != 1 && out != d {
                return Err(Error::Shape(format!("Attention: batch dims {ds:?} do not broadcast")));
            }
            out = d;
        }
    }
    Ok(if ds.contains(&0) { 0 } else { out })
}

/// Strides along B and H with broadcast dims read at stride 0.
fn batch_strides(v: &View) -> [usize; 2] {
    [0, 1].map(|i| if v.dims[i] == 1 { 0 } else { v.strides[i] })
}

/// Everything one task needs, shared by all tasks.
struct Plan<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    qv: View,
    kv: View,
    vv: View,
    qb: [usize; 2],
    kb: [usize; 2],
    vb: [usize; 2],
    mask: Option<(&'a [f32], [usize; 4])>,
    scale: f32,
    sk: usize,
    d: usize,
    dv: usize,
    /// Output strides of the logical [B, H, Sq, Dv] dims.
    out_strides: [usize; 4],
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output elements (its own batch, head and rows).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn attention(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let (q, k, v) = (ctx.input(inputs, 0)?, ctx.input(inputs, 1)?, ctx.input(inputs, 2)?);
    let qv = view(q, perm_attr(ctx, "q_perm")?, "Q")?;
    let kv = view(k, perm_attr(ctx, "k_perm")?, "K")?;
    let vv = view(v, perm_attr(ctx, "v_perm")?, "V")?;
    let out_perm = perm_attr(ctx, "out_perm")?;
    let [_, _, sq, d] = qv.dims;
    let [_, _, sk, dk] = kv.dims;
    let [_, _, skv, dv] = vv.dims;
    if dk != d || skv != sk {
        return Err(Error::Shape(format!("Attention: Q {:?}, K {:?}, V {:?} (logical) do not fit", qv.dims, kv.dims, vv.dims)));
    }
    let b = batch_dim(&[qv.dims[0], kv.dims[0], vv.dims[0]])?;
    let h = batch_dim(&[qv.dims[1], kv.dims[1], vv.dims[1]])?;
    let logical = [b, h, sq, dv];
    let mut out_shape = [0usize; 4];
    for (o, &p) in out_shape.iter_mut().zip(&out_perm) {
        *o = logical[p];
    }
    let ost = strides(&out_shape);
    let mut out_strides = [0usize; 4];
    for (j, &p) in out_perm.iter().enumerate() {
        out_strides[p] = ost[j];
    }
    let scores_shape = [b, h, sq, sk];
    let mask = match ctx.opt_input(inputs, 3) {
        Some(m) => Some(mask_view(m, &scores_shape)?),
        None => None,
    };
    if b * h * sq * dv == 0 {
        return Ok(vec![Tensor::zeros(DType::F32, &out_shape)]);
    }
    let plan = Plan {
        q: q.view::<f32>()?,
        k: k.view::<f32>()?,
        v: v.view::<f32>()?,
        qb: batch_strides(&qv),
        kb: batch_strides(&kv),
        vb: batch_strides(&vv),
        qv,
        kv,
        vv,
        mask,
        scale: ctx.attr_f("scale", 1.0),
        sk,
        d,
        dv,
        out_strides,
    };
    let rows = (BLOCK_ELEMS / sk.max(1)).max(8).min(sq.max(1));
    let blocks = sq.div_ceil(rows);
    let tasks: Vec<(usize, usize, usize)> =
        (0..b).flat_map(|bi| (0..h).flat_map(move |hi| (0..blocks).map(move |r| (bi, hi, r * rows)))).collect();
    // The tasks write every output element (each its own rows of one head), so the output comes
    // from the buffer pool unfilled.
    let y = Tensor::filled_by::<f32>(DType::F32, &out_shape, |out| {
        let dst = OutPtr(out.as_mut_ptr());
        let run = |&(bi, hi, r0): &(usize, usize, usize)| plan.block(bi, hi, r0, rows.min(sq - r0), dst);
        if tasks.len() > 1 && crate::cpu::par::threads() > 1 {
            tasks.par_iter().try_for_each(run)
        } else {
            tasks.iter().try_for_each(run)
        }
    })?;
    Ok(vec![y])
}

thread_local! {
    /// Per-thread working set, reused across blocks and calls (never zeroed: the products
    /// overwrite it).
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch { st: Vec::new(), o: Vec::new(), mx: Vec::new(), sum: Vec::new() })
    };
}

/// One task's working set: transposed scores, product rows, per-query max and sum.
struct Scratch {
    st: Vec<f32>,
    o: Vec<f32>,
    mx: Vec<f32>,
    sum: Vec<f32>,
}

/// The mask's data and its strides in the [B, H, Sq, Sk] score shape (0 along broadcast dims).
fn mask_view<'a>(m: &'a Tensor, scores: &[usize; 4]) -> Result<(&'a [f32], [usize; 4])> {
    if m.dtype() != DType::F32 {
        return Err(Error::DType(format!("Attention: mask is {}, expected f32", m.dtype())));
    }
    let ms = m.shape();
    let fits = ms.len() <= 4 && ms.iter().rev().zip(scores.iter().rev()).all(|(&a, &s)| a == 1 || a == s);
    if !fits {
        return Err(Error::Shape(format!("Attention: mask {ms:?} does not broadcast to scores {scores:?}")));
    }
    let st = broadcast_strides(ms, scores);
    Ok((m.view::<f32>()?, [st[0], st[1], st[2], st[3]]))
}

impl Plan<'_> {
    /// Rows r0..r0+m of head (bi, hi): scores, mask, softmax, ·V, stored through `dst`.
    ///
    /// The scores are computed transposed, Sᵀ = K·Qᵀ (keys × queries): the softmax then runs down
    /// the columns, one vector over 16 queries at a time, and S·V reads Sᵀ as a transposed A,
    /// which the GEMM packs with contiguous copies (packing a row-major S was a scalar gather
    /// costing as much as the product). Normalisation by 1/sum is applied to the m×Dv product
    /// rows instead of the m×Sk probabilities.
    fn block(&self, bi: usize, hi: usize, r0: usize, m: usize, dst: OutPtr) -> Result<()> {
        let (sk, d, dv) = (self.sk, self.d, self.dv);
        let qo = bi * self.qb[0] + hi * self.qb[1] + r0 * self.qv.strides[2];
        let ko = bi * self.kb[0] + hi * self.kb[1];
        let vo = bi * self.vb[0] + hi * self.vb[1];
        let kmat = MatRef::new(&self.k[ko..], self.kv.strides[2], self.kv.strides[3]);
        // Qᵀ as the D×m right operand: element (j, i) is Q[r0 + i, j].
        let qt = MatRef::new(&self.q[qo..], self.qv.strides[3], self.qv.strides[2]);
        SCRATCH.with(|scratch| -> Result<()> {
            let mut scratch = scratch.borrow_mut();
            let Scratch { st, o, mx, sum } = &mut *scratch;
            for (buf, len) in [(&mut *st, m * sk), (&mut *o, m * dv), (&mut *mx, m), (&mut *sum, m)] {
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
            }
            let (st, o, mx, sum) = (&mut st[..m * sk], &mut o[..m * dv], &mut mx[..m], &mut sum[..m]);
            let epi = Epilogue { alpha: self.scale, ..Epilogue::NONE };
            gemm::sgemm(sk, m, d, kmat, BRef::Mat(qt), st, m, false, &epi, false)?;
            let mask = self.mask.map(|(data, mst)| (data, mst, bi * mst[0] + hi * mst[1] + r0 * mst[2]));
            with_isa(#[inline(always)] || {
                mx.fill(f32::NEG_INFINITY);
                sum.fill(0.0);
                for (j, row) in st.chunks_exact_mut(m).enumerate() {
                    if let Some((data, mst, base)) = mask {
                        add_mask_row(row, data, base + j * mst[3], mst[2]);
                    }
                    // A NaN score is passed over here but reaches its column's sum through exp,
                    // and with it the whole output row, as in the graph.
                    for (a, &x) in mx.iter_mut().zip(row.iter()) {
                        *a = if x > *a { x } else { *a };
                    }
                }
                for row in st.chunks_exact_mut(m) {
                    for ((x, &c), s) in row.iter_mut().zip(mx.iter()).zip(sum.iter_mut()) {
                        let e = gemm::exp(*x - c);
                        *x = e;
                        *s += e;
                    }
                }
            });
            let vm = MatRef::new(&self.v[vo..], self.vv.strides[2], self.vv.strides[3]);
            gemm::sgemm(m, dv, sk, MatRef::cols(st, m), BRef::Mat(vm), o, dv, false, &Epilogue::NONE, false)?;
            for (row, &s) in o.chunks_exact_mut(dv).zip(sum.iter()) {
                let inv = 1.0 / s;
                row.iter_mut().for_each(|x| *x *= inv);
            }
            self.store(o, bi, hi, r0, dst);
            Ok(())
        })
    }

    /// Product rows r0.. of head (bi, hi) into the output through its strides.
    fn store(&self, o: &[f32], bi: usize, hi: usize, r0: usize, dst: OutPtr) {
        let dv = self.dv;
        let [ob, oh, os, od] = self.out_strides;
        let base = bi * ob + hi * oh + r0 * os;
        for (i, row) in o.chunks_exact(dv).enumerate() {
            let at = base + i * os;
            // SAFETY: (bi, hi, r0 + i, ·) lies inside the output, and no other task writes it.
            unsafe {
                if od == 1 {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), dst.0.add(at), dv);
                } else {
                    for (j, &x) in row.iter().enumerate() {
                        dst.0.add(at + j * od).write(x);
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn add_mask_row(row: &mut [f32], data: &[f32], at: usize, step: usize) {
    match step {
        0 => {
            let c = data[at];
            row.iter_mut().for_each(|x| *x += c);
        }
        1 => {
            let n = row.len();
            row.iter_mut().zip(&data[at..at + n]).for_each(|(x, &c)| *x += c)
        }
        _ => row.iter_mut().enumerate().for_each(|(j, x)| *x += data[at + j * step]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::elementwise::testing::{rand_f32, run_kiln};
    use kiln_runtime::manifest::Attr;

    fn run(attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        run_kiln("Attention", attrs, inputs)
    }

    fn ints(name: &str, v: &[i64]) -> Attr {
        Attr { name: name.into(), ints: v.to_vec(), ..Default::default() }
    }

    fn float(name: &str, f: f32) -> Attr {
        Attr { name: name.into(), f, ..Default::default() }
    }


    /// Element of `t` (row-major `shape`) at logical index `idx` of Transpose(t, perm).
    fn at(t: &[f32], shape: &[usize], perm: &[usize; 4], idx: [usize; 4]) -> f32 {
        let st = strides(shape);
        let bcast = |i: usize| if shape[perm[i]] == 1 { 0 } else { idx[i] };
        t[(0..4).map(|i| bcast(i) * st[perm[i]]).sum::<usize>()]
    }

    struct Case {
        q: (Vec<usize>, [usize; 4]),
        k: (Vec<usize>, [usize; 4]),
        v: (Vec<usize>, [usize; 4]),
        mask: Option<Vec<usize>>,
        out_perm: [usize; 4],
        scale: f32,
    }

    /// The reference: scores in f64 over the materialised [B,H,Sq,Sk] tensor.
    fn reference(c: &Case, q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>) -> (Vec<usize>, Vec<f32>) {
        let ld = |s: &Vec<usize>, p: &[usize; 4]| [s[p[0]], s[p[1]], s[p[2]], s[p[3]]];
        let (qd, kd, vd) = (ld(&c.q.0, &c.q.1), ld(&c.k.0, &c.k.1), ld(&c.v.0, &c.v.1));
        let b = qd[0].max(kd[0]).max(vd[0]);
        let h = qd[1].max(kd[1]).max(vd[1]);
        let (sq, d, sk, dv) = (qd[2], qd[3], kd[2], vd[3]);
        let logical = [b, h, sq, dv];
        let out_shape: Vec<usize> = c.out_perm.iter().map(|&p| logical[p]).collect();
        let ost = strides(&out_shape);
        let mut out = vec![0f32; b * h * sq * dv];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..sq {
                    let mut row: Vec<f64> = (0..sk)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|t| at(q, &c.q.0, &c.q.1, [bi, hi, i, t]) as f64 * at(k, &c.k.0, &c.k.1, [bi, hi, j, t]) as f64)
                                .sum();
                            let mut s = dot * c.scale as f64;
                            if let (Some(m), Some(ms)) = (mask, &c.mask) {
                                let full = [b, h, sq, sk];
                                let bs = broadcast_strides(ms, &full);
                                s += m[bi * bs[0] + hi * bs[1] + i * bs[2] + j * bs[3]] as f64;
                            }
                            s
                        })
                        .collect();
                    let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    row.iter_mut().for_each(|x| *x = (*x - mx).exp());
                    let sum: f64 = row.iter().sum();
                    for t in 0..dv {
                        let y: f64 = (0..sk).map(|j| row[j] / sum * at(v, &c.v.0, &c.v.1, [bi, hi, j, t]) as f64).sum();
                        let li = [bi, hi, i, t];
                        let pos: usize = (0..4).map(|jj| li[c.out_perm[jj]] * ost[jj]).sum();
                        out[pos] = y as f32;
                    }
                }
            }
        }
        (out_shape, out)
    }

    fn check(c: Case) {
        let n = |s: &Vec<usize>| s.iter().product::<usize>();
        let (q, k, v) = (rand_f32(n(&c.q.0), 1, 2.0), rand_f32(n(&c.k.0), 2, 2.0), rand_f32(n(&c.v.0), 3, 2.0));
        let mask = c.mask.as_ref().map(|m| rand_f32(n(m), 4, 2.0).into_iter().map(|x| if x < -1.5 { -10000.0 } else { x }).collect::<Vec<_>>());
        let (want_shape, want) = reference(&c, &q, &k, &v, mask.as_deref());
        let p = |x: &[usize; 4]| x.iter().map(|&a| a as i64).collect::<Vec<_>>();
        let attrs = vec![
            ints("q_perm", &p(&c.q.1)),
            ints("k_perm", &p(&c.k.1)),
            ints("v_perm", &p(&c.v.1)),
            ints("out_perm", &p(&c.out_perm)),
            float("scale", c.scale),
        ];
        let t = |s: &Vec<usize>, d: Vec<f32>| Some(Tensor::from_vec(s, d).unwrap());
        let mut inputs = vec![t(&c.q.0, q), t(&c.k.0, k), t(&c.v.0, v)];
        if let (Some(ms), Some(m)) = (&c.mask, mask) {
            inputs.push(t(ms, m));
        }
        let got = run(attrs, inputs).unwrap();
        assert_eq!(got[0].shape(), &want_shape[..]);
        for (i, (g, w)) in got[0].view::<f32>().unwrap().iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5 + 1e-4 * w.abs(), "element {i}: {g} vs {w}");
        }
    }

    const ID: [usize; 4] = [0, 1, 2, 3];
    const BSHD: [usize; 4] = [0, 2, 1, 3];

    #[test]
    fn plain_layout_with_and_without_mask() {
        for mask in [None, Some(vec![2, 1, 1, 7]), Some(vec![2, 3, 5, 7]), Some(vec![7])] {
            check(Case {
                q: (vec![2, 3, 5, 4], ID),
                k: (vec![2, 3, 7, 4], ID),
                v: (vec![2, 3, 7, 6], ID),
                mask,
                out_perm: ID,
                scale: 0.5,
            });
        }
    }

    #[test]
    fn head_split_layouts_are_read_in_place() {
        // Q, K, V as [B, S, H, D] (the Reshape output before the exporter's Transposes), output
        // written as [B, S, H, Dv].
        check(Case {
            q: (vec![2, 9, 3, 4], BSHD),
            k: (vec![2, 11, 3, 4], BSHD),
            v: (vec![2, 11, 3, 5], BSHD),
            mask: Some(vec![2, 1, 1, 11]),
            out_perm: BSHD,
            scale: 1.0 / 2.0f32.sqrt(),
        });
        // K given as Kᵀ [B, H, D, Sk].
        check(Case {
            q: (vec![1, 2, 3, 8], ID),
            k: (vec![1, 2, 8, 6], [0, 1, 3, 2]),
            v: (vec![1, 2, 6, 8], ID),
            mask: None,
            out_perm: ID,
            scale: 1.0,
        });
    }

    #[test]
    fn long_rows_split_into_blocks_and_broadcast_heads() {
        // Sk = 600 makes 27-row blocks, so Sq = 70 takes three blocks per head; K and V are shared
        // by all heads (H = 1 broadcasts).
        check(Case {
            q: (vec![1, 2, 70, 3], ID),
            k: (vec![1, 1, 600, 3], ID),
            v: (vec![1, 1, 600, 2], ID),
            mask: Some(vec![1, 1, 70, 600]),
            out_perm: ID,
            scale: 0.3,
        });
    }

    #[test]
    fn fully_masked_row_with_minus_inf_is_nan_like_the_graph() {
        let q = Tensor::from_vec(&[1, 1, 1, 1], vec![1f32]).unwrap();
        let k = Tensor::from_vec(&[1, 1, 2, 1], vec![1f32, 2.]).unwrap();
        let v = Tensor::from_vec(&[1, 1, 2, 1], vec![3f32, 5.]).unwrap();
        let m = Tensor::from_vec(&[2], vec![f32::NEG_INFINITY; 2]).unwrap();
        let y = run(vec![], vec![Some(q.clone()), Some(k.clone()), Some(v.clone()), Some(m)]).unwrap();
        assert!(y[0].view::<f32>().unwrap()[0].is_nan());
        // One finite entry: all weight on it.
        let m = Tensor::from_vec(&[2], vec![f32::NEG_INFINITY, 0.]).unwrap();
        let y = run(vec![], vec![Some(q), Some(k), Some(v), Some(m)]).unwrap();
        assert!((y[0].view::<f32>().unwrap()[0] - 5.0).abs() < 1e-6);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let t = |s: &[usize]| Some(Tensor::from_vec(s, vec![0f32; s.iter().product()]).unwrap());
        assert!(run(vec![], vec![t(&[1, 1, 2, 3]), t(&[1, 1, 2, 4]), t(&[1, 1, 2, 3])]).is_err(), "D mismatch");
        assert!(run(vec![], vec![t(&[1, 2, 3]), t(&[1, 2, 3]), t(&[1, 2, 3])]).is_err(), "rank 3");
        assert!(run(vec![], vec![t(&[2, 1, 2, 3]), t(&[3, 1, 2, 3]), t(&[1, 1, 2, 3])]).is_err(), "batch");
        assert!(run(vec![], vec![t(&[1, 1, 2, 3]), t(&[1, 1, 2, 3]), t(&[1, 1, 2, 3]), t(&[3])]).is_err(), "mask");
        assert!(run(vec![ints("q_perm", &[0, 1, 1, 3])], vec![t(&[1, 1, 2, 3]), t(&[1, 1, 2, 3]), t(&[1, 1, 2, 3])]).is_err());
    }
}
