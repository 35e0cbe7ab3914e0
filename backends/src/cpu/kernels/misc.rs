//! Ops that fit no family: Attention, RotaryEmbedding, Dropout, NonMaxSuppression, the loss ops
//! (NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss), Det, and signal processing (DFT, STFT,
//! window functions, MelWeightMatrix).

use kiln_runtime::{DType, Error, Result, Tensor};

use super::matmul::{sgemm, Mat};
use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{real_tensor, real_vec, strides};

pub fn register(r: &mut Registry) {
    r.add("Attention", attention);
    r.add("LinearAttention", linear_attention);
    r.add_in("ai.onnx.preview", "FlexAttention", flex_attention);
    r.add("RotaryEmbedding", rotary_embedding);
    r.add("Dropout", dropout);
    r.add("NonMaxSuppression", non_max_suppression);
    r.add("NegativeLogLikelihoodLoss", nll_loss);
    r.add("SoftmaxCrossEntropyLoss", softmax_cross_entropy_loss);
    r.add("Det", det);
    r.add("DFT", dft);
    r.add("STFT", stft);
    r.add("HannWindow", hann_window);
    r.add("HammingWindow", hamming_window);
    r.add("BlackmanWindow", blackman_window);
    r.add("MelWeightMatrix", mel_weight_matrix);
}

/// Any float tensor as f32 values.
fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(real_vec::<f32>(t)?.into_owned())
}

// ---------------------------------------------------------------------------------------------
// Attention (opset 23)
// ---------------------------------------------------------------------------------------------

/// A 4-D [batch, heads, seq, head_size] f32 copy of a 3-D [batch, seq, heads*head_size] or 4-D input.
fn heads_major(t: &Tensor, heads: Option<usize>) -> Result<(Vec<f32>, [usize; 4])> {
    let v = f32s(t)?;
    match *t.shape() {
        [b, h, s, d] => Ok((v, [b, h, s, d])),
        [b, s, hd] => {
            let h = heads.ok_or_else(|| Error::Other("3-D attention inputs need q_num_heads and kv_num_heads".into()))?;
            if h == 0 || hd % h != 0 {
                return Err(Error::Shape(format!("hidden size {hd} is not divisible by {h} heads")));
            }
            let d = hd / h;
            let mut o = vec![0.0f32; v.len()];
            for bi in 0..b {
                for si in 0..s {
                    for hi in 0..h {
                        let src = (bi * s + si) * hd + hi * d;
                        let dst = ((bi * h + hi) * s + si) * d;
                        o[dst..dst + d].copy_from_slice(&v[src..src + d]);
                    }
                }
            }
            Ok((o, [b, h, s, d]))
        }
        _ => Err(Error::Shape(format!("attention inputs must be 3-D or 4-D, got {:?}", t.shape()))),
    }
}

/// Concatenate the cache `past` [b, h, p, d] and `new` [b, h, s, d] along the sequence.
fn concat_seq(past: Option<(&[f32], usize)>, new: &[f32], dims: [usize; 4]) -> (Vec<f32>, usize) {
    let [b, h, s, d] = dims;
    let Some((pv, p)) = past else { return (new.to_vec(), s) };
    let total = p + s;
    let mut o = Vec::with_capacity(b * h * total * d);
    for bh in 0..b * h {
        o.extend_from_slice(&pv[bh * p * d..(bh + 1) * p * d]);
        o.extend_from_slice(&new[bh * s * d..(bh + 1) * s * d]);
    }
    (o, total)
}

/// The additive mask for one (batch, head): [sq, total], from attn_mask (bool or float, broadcast
/// from the right, shorter last dim padded with -inf), is_causal and nonpad_kv_seqlen.
struct Bias {
    vals: Option<Vec<f32>>,
    /// Broadcast strides over [batch, head, sq, len] into `vals`.
    st: [usize; 4],
    mask_len: usize,
    causal_past: Option<usize>,
    nonpad: Option<Vec<i64>>,
}

impl Bias {
    fn fill(&self, b: usize, h: usize, sq: usize, total: usize, out: &mut [f32]) {
        out.fill(0.0);
        if let Some(v) = &self.vals {
            for i in 0..sq {
                let base = b * self.st[0] + h * self.st[1] + i * self.st[2];
                let row = &mut out[i * total..(i + 1) * total];
                for (j, o) in row.iter_mut().enumerate() {
                    *o = if j < self.mask_len { v[base + j * self.st[3]] } else { f32::NEG_INFINITY };
                }
            }
        }
        if let Some(past) = self.causal_past {
            for i in 0..sq {
                for j in (i + past + 1).min(total)..total {
                    out[i * total + j] = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(np) = &self.nonpad {
            let n = np[b].clamp(0, total as i64) as usize;
            for i in 0..sq {
                out[i * total + n..(i + 1) * total].fill(f32::NEG_INFINITY);
            }
        }
    }
}

fn attention(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let qt = ctx.input(inputs, 0)?;
    let kt = ctx.input(inputs, 1)?;
    let vt = ctx.input(inputs, 2)?;
    let dt = qt.dtype();
    let qh = ctx.attr_i_opt("q_num_heads").map(|v| v as usize);
    let kvh = ctx.attr_i_opt("kv_num_heads").map(|v| v as usize);
    let three_d = qt.rank() == 3;
    if kt.rank() != qt.rank() || vt.rank() != qt.rank() {
        return Err(Error::Shape("Q, K and V must have the same rank".into()));
    }
    let (q, [b, hq, sq, dh]) = heads_major(qt, qh)?;
    let (k, kdims) = heads_major(kt, kvh)?;
    let (v, vdims) = heads_major(vt, kvh)?;
    let hkv = kdims[1];
    let dv = vdims[3];
    if kdims[0] != b || vdims[0] != b || vdims[1] != hkv || kdims[3] != dh || vdims[2] != kdims[2] {
        return Err(Error::Shape(format!(
            "incompatible Q {:?}, K {:?}, V {:?}",
            qt.shape(),
            kt.shape(),
            vt.shape()
        )));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(Error::Shape(format!("{hq} query heads cannot share {hkv} key/value heads")));
    }
    let past_k = ctx.opt_input(inputs, 4);
    let past_v = ctx.opt_input(inputs, 5);
    let past_len = past_k.map(|t| t.shape().get(2).copied().unwrap_or(0));
    let pk = past_k.map(f32s).transpose()?;
    let pv = past_v.map(f32s).transpose()?;
    if let (Some(t), Some(p)) = (past_k, past_len) {
        if t.shape() != [b, hkv, p, dh] {
            return Err(Error::Shape(format!("past_key has shape {:?}", t.shape())));
        }
    }
    if let (Some(t), Some(p)) = (past_v, past_len) {
        if t.shape() != [b, hkv, p, dv] {
            return Err(Error::Shape(format!("past_value has shape {:?}", t.shape())));
        }
    }
    let (pk_total, total) = concat_seq(pk.as_deref().zip(past_len), &k, kdims);
    let (pv_total, _) = concat_seq(pv.as_deref().zip(past_len), &v, vdims);

    let scale = ctx.attr_f_opt("scale").unwrap_or(1.0 / (dh as f32).sqrt());
    let softcap = ctx.attr_f("softcap", 0.0);
    let mode = ctx.attr_i("qk_matmul_output_mode", 0);
    if !(0..=3).contains(&mode) {
        return Err(ctx.unsupported(format!("qk_matmul_output_mode {mode}")));
    }

    let mask = ctx.opt_input(inputs, 3);
    let bias = {
        let (vals, st, mask_len) = match mask {
            Some(m) => {
                let vals: Vec<f32> = if m.dtype() == DType::Bool {
                    m.view::<bool>()?.iter().map(|&x| if x { 0.0 } else { f32::NEG_INFINITY }).collect()
                } else {
                    f32s(m)?
                };
                if m.rank() > 4 || m.rank() == 0 {
                    return Err(Error::Shape(format!("attn_mask has shape {:?}", m.shape())));
                }
                let mut shp = vec![1usize; 4 - m.rank()];
                shp.extend_from_slice(m.shape());
                let ms = strides(&shp);
                let want = [b, hq, sq];
                let mut st = [0usize; 4];
                for i in 0..3 {
                    if shp[i] != 1 && shp[i] != want[i] {
                        return Err(Error::Shape(format!("attn_mask {:?} does not broadcast", m.shape())));
                    }
                    st[i] = if shp[i] == 1 { 0 } else { ms[i] };
                }
                st[3] = 1;
                if shp[3] > total {
                    return Err(Error::Shape(format!("attn_mask {:?} is longer than {total}", m.shape())));
                }
                (Some(vals), st, shp[3])
            }
            None => (None, [0; 4], total),
        };
        let nonpad = match ctx.opt_input(inputs, 6) {
            Some(t) => {
                let v = t.to_i64_vec()?;
                if v.len() != b {
                    return Err(Error::Shape(format!("nonpad_kv_seqlen has {} entries for batch {b}", v.len())));
                }
                Some(v)
            }
            None => None,
        };
        let causal = ctx.attr_i("is_causal", 0) != 0;
        Bias { vals, st, mask_len, causal_past: causal.then(|| past_len.unwrap_or(0)), nonpad }
    };

    let want_qk = ctx.output_wanted(3);
    let reps = hq / hkv;
    let mut y = vec![0.0f32; b * hq * sq * dv];
    let mut qk_out = vec![0.0f32; if want_qk { b * hq * sq * total } else { 0 }];
    let qk_chunk = if want_qk { sq * total } else { 0 };
    let one = |bh: usize, yc: &mut [f32], qc: &mut [f32]| -> Result<()> {
        let (bi, hi) = (bh / hq, bh % hq);
        let kvi = bi * hkv + hi / reps;
        let qb = &q[bh * sq * dh..(bh + 1) * sq * dh];
        let kb = &pk_total[kvi * total * dh..(kvi + 1) * total * dh];
        let vb = &pv_total[kvi * total * dv..(kvi + 1) * total * dv];
        let mut s = vec![0.0f32; sq * total];
        sgemm(sq, total, dh, Mat::rows(qb, dh), Mat::cols(kb, dh), false, &mut s, total, false)?;
        for x in s.iter_mut() {
            *x *= scale;
        }
        if want_qk && mode == 0 {
            qc.copy_from_slice(&s);
        }
        if softcap > 0.0 {
            for x in s.iter_mut() {
                *x = softcap * (*x / softcap).tanh();
            }
        }
        if want_qk && mode == 1 {
            qc.copy_from_slice(&s);
        }
        let mut bias_buf = vec![0.0f32; sq * total];
        bias.fill(bi, hi, sq, total, &mut bias_buf);
        for (x, bv) in s.iter_mut().zip(&bias_buf) {
            *x += bv;
        }
        if want_qk && mode == 2 {
            qc.copy_from_slice(&s);
        }
        for row in s.chunks_exact_mut(total.max(1)) {
            softmax_row(row);
        }
        if want_qk && mode == 3 {
            qc.copy_from_slice(&s);
        }
        sgemm(sq, dv, total, Mat::rows(&s, total), Mat::rows(vb, dv), false, yc, dv, false)
    };
    let ychunk = (sq * dv).max(1);
    if want_qk {
        crate::cpu::par::try_chunks_mut2(&mut y, ychunk, &mut qk_out, qk_chunk, |bh, yc, qc| one(bh, yc, qc))?;
    } else {
        crate::cpu::par::try_chunks_mut(&mut y, ychunk, |bh, yc| one(bh, yc, &mut []))?;
    }

    let y_t = if three_d {
        let mut o = vec![0.0f32; y.len()];
        for bi in 0..b {
            for hi in 0..hq {
                for si in 0..sq {
                    let src = ((bi * hq + hi) * sq + si) * dv;
                    let dst = (bi * sq + si) * hq * dv + hi * dv;
                    o[dst..dst + dv].copy_from_slice(&y[src..src + dv]);
                }
            }
        }
        real_tensor(dt, &[b, sq, hq * dv], o)?
    } else {
        real_tensor(dt, &[b, hq, sq, dv], y)?
    };
    let mut outs = vec![y_t];
    if ctx.num_outputs() > 1 {
        outs.push(real_tensor(dt, &[b, hkv, total, dh], pk_total)?);
        outs.push(real_tensor(dt, &[b, hkv, total, dv], pv_total)?);
        outs.push(real_tensor(dt, &[b, hq, sq, if want_qk { total } else { 0 }], qk_out)?);
    }
    Ok(outs)
}

/// FlexAttention without modifier subgraphs is plain 4-D attention (scale as Attention's).
fn flex_attention(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    for g in ["score_mod", "prob_mod"] {
        if ctx.attr_graph(g).is_some() {
            return Err(ctx.unsupported(format!("{g} subgraph")));
        }
    }
    if inputs.iter().take(3).any(|t| t.as_ref().is_some_and(|t| t.rank() != 4)) {
        return Err(Error::Shape("FlexAttention inputs must be 4-D".into()));
    }
    let mut out = attention(ctx, &inputs[..inputs.len().min(3)])?;
    out.truncate(1);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// LinearAttention (opset 27)
// ---------------------------------------------------------------------------------------------

fn linear_attention(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let qt = ctx.input(inputs, 0)?;
    let kt = ctx.input(inputs, 1)?;
    let vt = ctx.input(inputs, 2)?;
    let rule = ctx.attr_s("update_rule", "gated_delta");
    let (gating, delta) = match rule.as_str() {
        "linear" => (false, false),
        "gated" => (true, false),
        "delta" => (false, true),
        "gated_delta" => (true, true),
        r => return Err(ctx.unsupported(format!("update_rule '{r}'"))),
    };
    let hq = ctx.attr_i("q_num_heads", 0);
    let hkv = ctx.attr_i("kv_num_heads", 0);
    if hq <= 0 || hkv <= 0 || hq % hkv != 0 {
        return Err(Error::Shape(format!("q_num_heads {hq} must be a positive multiple of kv_num_heads {hkv}")));
    }
    let (hq, hkv) = (hq as usize, hkv as usize);
    let (b, t) = match *qt.shape() {
        [b, t, _] => (b, t),
        _ => return Err(Error::Shape(format!("query must be [B, T, H*D], got {:?}", qt.shape()))),
    };
    // (B, T, H, D) views: heads packed in the last dim.
    let (q, [_, _, _, dk]) = heads_major(qt, Some(hq))?;
    let (k, kd) = heads_major(kt, Some(hkv))?;
    let (v, [_, _, _, dv]) = heads_major(vt, Some(hkv))?;
    if kd != [b, hkv, t, dk] || vt.shape()[..2] != [b, t] {
        return Err(Error::Shape(format!("key {:?} / value {:?} do not match query {:?}", kt.shape(), vt.shape(), qt.shape())));
    }
    let decay = ctx.opt_input(inputs, 4);
    let beta = ctx.opt_input(inputs, 5);
    if gating != decay.is_some() || delta != beta.is_some() {
        return Err(Error::Other(format!("update_rule '{rule}' needs decay: {gating}, beta: {delta}")));
    }
    // decay: [B, T, Hkv] (per head) or [B, T, Hkv*dk] (per key dim); beta: [B, T, Hkv] or [B, T, 1].
    let decay_v = decay.map(f32s).transpose()?;
    let g_width = match decay {
        Some(d) if d.shape() == [b, t, hkv] => 1,
        Some(d) if d.shape() == [b, t, hkv * dk] => dk,
        Some(d) => return Err(Error::Shape(format!("decay has shape {:?}", d.shape()))),
        None => 0,
    };
    let beta_v = beta.map(f32s).transpose()?;
    let beta_heads = match beta {
        Some(x) if x.shape() == [b, t, hkv] => hkv,
        Some(x) if x.shape() == [b, t, 1] => 1,
        Some(x) => return Err(Error::Shape(format!("beta has shape {:?}", x.shape()))),
        None => 0,
    };
    let past = ctx.opt_input(inputs, 3);
    let mut state = match past {
        Some(p) => {
            if p.shape() != [b, hkv, dk, dv] {
                return Err(Error::Shape(format!("past_state has shape {:?}", p.shape())));
            }
            f32s(p)?
        }
        None => vec![0.0f32; b * hkv * dk * dv],
    };
    let scale = match ctx.attr_f("scale", 0.0) {
        0.0 => 1.0 / (dk as f32).sqrt(),
        s => s,
    };
    let group = hq / hkv;
    let mut out = vec![0.0f32; b * t * hq * dv];
    let mut vt_buf = vec![0.0f32; dv];
    for bi in 0..b {
        for h in 0..hkv {
            let st = &mut state[(bi * hkv + h) * dk * dv..(bi * hkv + h + 1) * dk * dv];
            for ti in 0..t {
                let row = (bi * hkv + h) * t + ti;
                let kr = &k[row * dk..(row + 1) * dk];
                vt_buf.copy_from_slice(&v[row * dv..(row + 1) * dv]);
                if let Some(g) = &decay_v {
                    let base = (bi * t + ti) * hkv * g_width + h * g_width;
                    for d in 0..dk {
                        let f = g[base + if g_width == 1 { 0 } else { d }].exp();
                        st[d * dv..(d + 1) * dv].iter_mut().for_each(|s| *s *= f);
                    }
                }
                if let Some(bv) = &beta_v {
                    let bt = bv[(bi * t + ti) * beta_heads + if beta_heads == 1 { 0 } else { h }];
                    for m in 0..dv {
                        let retrieved: f32 = (0..dk).map(|d| st[d * dv + m] * kr[d]).sum();
                        vt_buf[m] = bt * (vt_buf[m] - retrieved);
                    }
                }
                for d in 0..dk {
                    let kd = kr[d];
                    for (s, &vv) in st[d * dv..(d + 1) * dv].iter_mut().zip(&vt_buf) {
                        *s += kd * vv;
                    }
                }
                for qh in h * group..(h + 1) * group {
                    let qr = &q[((bi * hq + qh) * t + ti) * dk..((bi * hq + qh) * t + ti + 1) * dk];
                    let o = &mut out[((bi * t + ti) * hq + qh) * dv..((bi * t + ti) * hq + qh + 1) * dv];
                    for d in 0..dk {
                        let qd = qr[d] * scale;
                        for (ov, &s) in o.iter_mut().zip(&st[d * dv..(d + 1) * dv]) {
                            *ov += qd * s;
                        }
                    }
                }
            }
        }
    }
    let state_dt = past.map_or(qt.dtype(), |p| p.dtype());
    Ok(vec![
        real_tensor(qt.dtype(), &[b, t, hq * dv], out)?,
        real_tensor(state_dt, &[b, hkv, dk, dv], state)?,
    ])
}

/// In-place softmax of one row; a row that is all -inf becomes NaN (as the reference gives).
fn softmax_row(row: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

// ---------------------------------------------------------------------------------------------
// RotaryEmbedding (opset 23)
// ---------------------------------------------------------------------------------------------

fn rotary_embedding(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let xt = ctx.input(inputs, 0)?;
    let cos_t = ctx.input(inputs, 1)?;
    let sin_t = ctx.input(inputs, 2)?;
    let pos = ctx.opt_input(inputs, 3).map(|t| t.to_i64_vec()).transpose()?;
    let interleaved = ctx.attr_i("interleaved", 0) != 0;
    let x = f32s(xt)?;
    // Element (b, s, h, :) lives at b*sb + s*ss + h*hs in both layouts.
    let (b, s, h, d, sb, ss, hs) = match *xt.shape() {
        [b, h, s, d] => (b, s, h, d, h * s * d, d, s * d),
        [b, s, hd] => {
            let h = ctx.attr_i("num_heads", 0);
            if h <= 0 || hd % h as usize != 0 {
                return Err(Error::Shape(format!("3-D input needs num_heads dividing {hd}, got {h}")));
            }
            let h = h as usize;
            (b, s, h, hd / h, s * hd, hd, hd / h)
        }
        _ => return Err(Error::Shape(format!("RotaryEmbedding input must be 3-D or 4-D, got {:?}", xt.shape()))),
    };
    let rd = match ctx.attr_i("rotary_embedding_dim", 0) {
        0 => d,
        r => r as usize,
    };
    if rd > d || rd % 2 != 0 {
        return Err(Error::Shape(format!("rotary_embedding_dim {rd} invalid for head size {d}")));
    }
    let half = rd / 2;
    let cos = f32s(cos_t)?;
    let sin = f32s(sin_t)?;
    if cos_t.shape().last() != Some(&half) || sin_t.shape() != cos_t.shape() {
        return Err(Error::Shape(format!(
            "cos/sin caches {:?} / {:?} do not end in rotary_dim/2 = {half}",
            cos_t.shape(),
            sin_t.shape()
        )));
    }
    // The cache row for (batch, position).
    let row = |bi: usize, si: usize| -> Result<usize> {
        match &pos {
            Some(p) => {
                let r = *p.get(bi * s + si).ok_or_else(|| Error::Shape("position_ids too short".into()))?;
                if r < 0 || (r as usize + 1) * half > cos.len() {
                    return Err(Error::Shape(format!("position id {r} outside the cache")));
                }
                Ok(r as usize)
            }
            None => {
                if cos_t.shape() != [b, s, half] {
                    return Err(Error::Shape(format!("without position_ids the caches must be [{b}, {s}, {half}]")));
                }
                Ok(bi * s + si)
            }
        }
    };
    let mut y = x.clone();
    for bi in 0..b {
        for si in 0..s {
            let r = row(bi, si)?;
            let (c, sn) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            for hi in 0..h {
                let off = bi * sb + si * ss + hi * hs;
                let xs = &x[off..off + d];
                let ys = &mut y[off..off + d];
                for k in 0..half {
                    let (i1, i2) = if interleaved { (2 * k, 2 * k + 1) } else { (k, k + half) };
                    let (x1, x2) = (xs[i1], xs[i2]);
                    ys[i1] = c[k] * x1 - sn[k] * x2;
                    ys[i2] = sn[k] * x1 + c[k] * x2;
                }
            }
        }
    }
    Ok(vec![real_tensor(xt.dtype(), xt.shape(), y)?])
}

// ---------------------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------------------

fn dropout(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (ratio, training) = if ctx.opset() >= 12 {
        let ratio = match ctx.opt_input(inputs, 1) {
            Some(t) => t.to_f64_vec()?.first().copied().unwrap_or(0.5),
            None => 0.5,
        };
        let training = match ctx.opt_input(inputs, 2) {
            Some(t) => t.view::<bool>()?.first().copied().unwrap_or(false),
            None => false,
        };
        (ratio, training)
    } else {
        // Older versions are only ever run for inference.
        (ctx.attr_f("ratio", 0.5) as f64, false)
    };
    let mask_dt = if ctx.opset() >= 10 { DType::Bool } else { x.dtype() };
    if !training || ratio == 0.0 {
        let mask = if mask_dt == DType::Bool {
            Tensor::from_vec(x.shape(), vec![true; x.len()])?
        } else {
            ones_like(x)?
        };
        return Ok(vec![x.clone(), mask]);
    }
    if !(0.0..1.0).contains(&ratio) {
        return Err(Error::Other(format!("dropout ratio {ratio} is outside [0, 1)")));
    }
    // Training mode: numpy's RandomState(seed).uniform stream, so seeded results match the
    // reference implementation.
    let mut rng = Mt19937::new(ctx.attr_i("seed", 0) as u32);
    let keep: Vec<bool> = (0..x.len()).map(|_| rng.next_f64() >= ratio).collect();
    let scale = 1.0 / (1.0 - ratio);
    let xv = x.to_f64_vec()?;
    let yv: Vec<f64> = xv.iter().zip(&keep).map(|(&v, &k)| if k { v * scale } else { 0.0 }).collect();
    let y = crate::with_real!(x.dtype(), R, {
        real_tensor::<R>(x.dtype(), x.shape(), yv.iter().map(|&v| <R as crate::cpu::util::Real>::from_f64(v)).collect())?
    });
    Ok(vec![y, Tensor::from_vec(x.shape(), keep)?])
}

/// The MT19937 generator as numpy's legacy RandomState seeds and samples it.
struct Mt19937 {
    mt: [u32; 624],
    idx: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Mt19937 {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for i in 1..624 {
            mt[i] = 1812433253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { mt, idx: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.idx >= 624 {
            for i in 0..624 {
                let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7FFF_FFFF);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_B0DF;
                }
                self.mt[i] = v;
            }
            self.idx = 0;
        }
        let mut y = self.mt[self.idx];
        self.idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9D2C_5680;
        y ^= (y << 15) & 0xEFC6_0000;
        y ^ (y >> 18)
    }

    /// A uniform double in [0, 1) with 53 random bits (numpy's random_sample).
    fn next_f64(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67108864.0 + b) / 9007199254740992.0
    }
}

/// A tensor of ones shaped and typed like `x` (numeric dtypes).
fn ones_like(x: &Tensor) -> Result<Tensor> {
    crate::with_numeric!(x.dtype(), T, {
        let one: T = num_one::<T>();
        Tensor::from_vec(x.shape(), vec![one; x.len()])
    })
}

fn num_one<T: kiln_runtime::Elem>() -> T {
    // Every numeric Elem has a 1 whose bytes we can build from an f64 conversion of its dtype.
    let t = Tensor::from_vec(&[1], vec![1.0f64]).expect("scalar");
    let c = match T::DTYPE {
        DType::F64 => t,
        DType::F32 => Tensor::from_vec(&[1], vec![1.0f32]).expect("scalar"),
        DType::F16 => Tensor::from_vec(&[1], vec![half::f16::ONE]).expect("scalar"),
        DType::BF16 => Tensor::from_vec(&[1], vec![half::bf16::ONE]).expect("scalar"),
        d => {
            let mut b = vec![0u8; d.size()];
            b[0] = 1;
            Tensor::from_bytes(d, &[1], &b).expect("scalar")
        }
    };
    c.view::<T>().expect("dtype matches")[0]
}

// ---------------------------------------------------------------------------------------------
// NonMaxSuppression
// ---------------------------------------------------------------------------------------------

/// A box as (x_min, y_min, x_max, y_max).
fn corners(b: &[f32], center: bool) -> [f32; 4] {
    if center {
        let (hw, hh) = (b[2] / 2.0, b[3] / 2.0);
        [b[0] - hw, b[1] - hh, b[0] + hw, b[1] + hh]
    } else {
        [b[1].min(b[3]), b[0].min(b[2]), b[1].max(b[3]), b[0].max(b[2])]
    }
}

/// Whether boxes a and b overlap by more than `thr` (intersection over union).
fn iou_exceeds(a: &[f32; 4], b: &[f32; 4], thr: f32) -> bool {
    let ix = a[2].min(b[2]) - a[0].max(b[0]);
    let iy = a[3].min(b[3]) - a[1].max(b[1]);
    if ix <= 0.0 || iy <= 0.0 {
        return false;
    }
    let inter = ix * iy;
    let area_a = (a[2] - a[0]) * (a[3] - a[1]);
    let area_b = (b[2] - b[0]) * (b[3] - b[1]);
    let union = area_a + area_b - inter;
    if area_a <= 0.0 || area_b <= 0.0 || union <= 0.0 {
        return false;
    }
    inter / union > thr
}

fn non_max_suppression(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let boxes_t = ctx.input(inputs, 0)?;
    let scores_t = ctx.input(inputs, 1)?;
    let scalar_f = |i: usize| -> Result<Option<f32>> {
        match ctx.opt_input(inputs, i) {
            Some(t) if !t.is_empty() => Ok(Some(t.to_f64_vec()?[0] as f32)),
            _ => Ok(None),
        }
    };
    let max_out = match ctx.opt_input(inputs, 2) {
        Some(t) if !t.is_empty() => t.to_i64_vec()?[0].max(0) as usize,
        _ => 0,
    };
    let iou_thr = scalar_f(3)?.unwrap_or(0.0);
    let score_thr = scalar_f(4)?;
    let center = ctx.attr_i("center_point_box", 0) != 0;
    let (nb, nbox) = match *boxes_t.shape() {
        [b, n, 4] => (b, n),
        _ => return Err(Error::Shape(format!("boxes must be [batch, boxes, 4], got {:?}", boxes_t.shape()))),
    };
    let nc = match *scores_t.shape() {
        [b, c, n] if b == nb && n == nbox => c,
        _ => return Err(Error::Shape(format!("scores {:?} do not match boxes {:?}", scores_t.shape(), boxes_t.shape()))),
    };
    let boxes = f32s(boxes_t)?;
    let scores = f32s(scores_t)?;
    let mut sel: Vec<i64> = Vec::new();
    for bi in 0..nb {
        let bx: Vec<[f32; 4]> =
            (0..nbox).map(|i| corners(&boxes[(bi * nbox + i) * 4..(bi * nbox + i + 1) * 4], center)).collect();
        for ci in 0..nc {
            let sc = &scores[(bi * nc + ci) * nbox..(bi * nc + ci + 1) * nbox];
            let mut cand: Vec<usize> = (0..nbox).filter(|&i| score_thr.is_none_or(|t| sc[i] > t)).collect();
            // Highest score first; ties keep the lower index first.
            cand.sort_by(|&a, &b| sc[b].partial_cmp(&sc[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
            let mut kept: Vec<usize> = Vec::new();
            for i in cand {
                if kept.len() >= max_out {
                    break;
                }
                if kept.iter().all(|&k| !iou_exceeds(&bx[i], &bx[k], iou_thr)) {
                    kept.push(i);
                    sel.extend_from_slice(&[bi as i64, ci as i64, i as i64]);
                }
            }
        }
    }
    let n = sel.len() / 3;
    Ok(vec![Tensor::from_vec(&[n, 3], sel)?])
}

// ---------------------------------------------------------------------------------------------
// Losses
// ---------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
/// -log-probability gathered at each target, weighted, then reduced. `logp` is [N, C, D] (D is
/// the product of the trailing dims), `target` [N, D].
fn nll_core(
    ctx: &OpCtx,
    logp: &[f64],
    target: &[i64],
    weight: Option<&[f64]>,
    n: usize,
    c: usize,
    d: usize,
    target_shape: &[usize],
) -> Result<(Vec<f64>, Vec<usize>)> {
    let ignore = ctx.attr_i_opt("ignore_index");
    let reduction = ctx.attr_s("reduction", "mean");
    let mut loss = vec![0.0f64; n * d];
    let mut wsum = 0.0f64;
    for ni in 0..n {
        for di in 0..d {
            let t = target[ni * d + di];
            if Some(t) == ignore {
                continue;
            }
            if t < 0 || t as usize >= c {
                return Err(Error::Other(format!("target {t} is outside [0, {c})")));
            }
            let w = weight.map_or(1.0, |w| w[t as usize]);
            loss[ni * d + di] = -logp[(ni * c + t as usize) * d + di] * w;
            wsum += w;
        }
    }
    match reduction.as_str() {
        "none" => Ok((loss, target_shape.to_vec())),
        "sum" => Ok((vec![loss.iter().sum()], vec![])),
        "mean" => {
            let s: f64 = loss.iter().sum();
            // Without weights or ignored entries the weight sum is just the element count.
            Ok((vec![s / wsum], vec![]))
        }
        r => Err(ctx.unsupported(format!("reduction '{r}'"))),
    }
}

/// Split an [N, C, d1, ...] input into (N, C, D) and check the target [N, d1, ...].
fn loss_dims(x: &Tensor, target: &Tensor) -> Result<(usize, usize, usize)> {
    let s = x.shape();
    if s.len() < 2 || target.shape().len() != s.len() - 1 || target.shape()[0] != s[0] || target.shape()[1..] != s[2..] {
        return Err(Error::Shape(format!("input {:?} and target {:?} do not match", s, target.shape())));
    }
    Ok((s[0], s[1], s[2..].iter().product()))
}

fn weights(ctx: &OpCtx, inputs: &[Option<Tensor>], c: usize) -> Result<Option<Vec<f64>>> {
    match ctx.opt_input(inputs, 2) {
        Some(w) => {
            let v = w.to_f64_vec()?;
            if v.len() != c {
                return Err(Error::Shape(format!("weight has {} entries for {c} classes", v.len())));
            }
            Ok(Some(v))
        }
        None => Ok(None),
    }
}

fn f64_tensor(dt: DType, shape: &[usize], v: Vec<f64>) -> Result<Tensor> {
    real_tensor::<f64>(dt, shape, v)
}

fn nll_loss(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let target = ctx.input(inputs, 1)?;
    let (n, c, d) = loss_dims(x, target)?;
    let w = weights(ctx, inputs, c)?;
    let (loss, shape) = nll_core(ctx, &x.to_f64_vec()?, &target.to_i64_vec()?, w.as_deref(), n, c, d, target.shape())?;
    Ok(vec![f64_tensor(x.dtype(), &shape, loss)?])
}

fn softmax_cross_entropy_loss(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let target = ctx.input(inputs, 1)?;
    let (n, c, d) = loss_dims(x, target)?;
    let xv = x.to_f64_vec()?;
    // log_softmax over the class axis.
    let mut logp = xv.clone();
    for ni in 0..n {
        for di in 0..d {
            let at = |ci: usize| (ni * c + ci) * d + di;
            let m = (0..c).map(|ci| xv[at(ci)]).fold(f64::NEG_INFINITY, f64::max);
            let lse = m + (0..c).map(|ci| (xv[at(ci)] - m).exp()).sum::<f64>().ln();
            for ci in 0..c {
                logp[at(ci)] = xv[at(ci)] - lse;
            }
        }
    }
    let w = weights(ctx, inputs, c)?;
    let (loss, shape) = nll_core(ctx, &logp, &target.to_i64_vec()?, w.as_deref(), n, c, d, target.shape())?;
    Ok(vec![f64_tensor(x.dtype(), &shape, loss)?, f64_tensor(x.dtype(), x.shape(), logp)?])
}

// ---------------------------------------------------------------------------------------------
// Det
// ---------------------------------------------------------------------------------------------

/// Determinant by LU decomposition with partial pivoting.
fn det_of(mut a: Vec<f64>, n: usize) -> f64 {
    let mut det = 1.0;
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().partial_cmp(&a[j * n + col].abs()).unwrap_or(std::cmp::Ordering::Equal))
            .unwrap_or(col);
        if a[piv * n + col] == 0.0 {
            return 0.0;
        }
        if piv != col {
            for k in 0..n {
                a.swap(piv * n + k, col * n + k);
            }
            det = -det;
        }
        let p = a[col * n + col];
        det *= p;
        for r in col + 1..n {
            let f = a[r * n + col] / p;
            if f != 0.0 {
                for k in col..n {
                    a[r * n + k] -= f * a[col * n + k];
                }
            }
        }
    }
    det
}

fn det(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let s = x.shape();
    let r = s.len();
    if r < 2 || s[r - 1] != s[r - 2] {
        return Err(Error::Shape(format!("Det needs [..., M, M], got {s:?}")));
    }
    let n = s[r - 1];
    let v = x.to_f64_vec()?;
    let out: Vec<f64> = v.chunks(n * n).map(|m| det_of(m.to_vec(), n)).collect();
    let out = if n == 0 { vec![1.0; s[..r - 2].iter().product()] } else { out };
    Ok(vec![f64_tensor(x.dtype(), &s[..r - 2], out)?])
}

// ---------------------------------------------------------------------------------------------
// DFT / STFT
// ---------------------------------------------------------------------------------------------

/// A complex transform of one fixed length: radix-2 FFT for powers of two, otherwise a direct
/// DFT over a shared twiddle table.
struct Dft {
    n: usize,
    /// e^{-2πik/n} (forward) or e^{+2πik/n} (inverse), k in 0..n.
    tw: Vec<(f64, f64)>,
}

impl Dft {
    fn new(n: usize, inverse: bool) -> Dft {
        let sign = if inverse { 1.0 } else { -1.0 };
        let tw = (0..n)
            .map(|k| {
                let a = sign * 2.0 * std::f64::consts::PI * k as f64 / n as f64;
                (a.cos(), a.sin())
            })
            .collect();
        Dft { n, tw }
    }

    /// Transform `x` (length n) in place, using `tmp` as scratch.
    fn run(&self, x: &mut [(f64, f64)], tmp: &mut Vec<(f64, f64)>) {
        let n = self.n;
        if n <= 1 {
            return;
        }
        if n.is_power_of_two() {
            // Bit-reversal permutation, then iterative butterflies.
            let bits = n.trailing_zeros();
            for i in 0..n {
                let j = i.reverse_bits() >> (usize::BITS - bits);
                if j > i {
                    x.swap(i, j);
                }
            }
            let mut len = 2;
            while len <= n {
                let step = n / len;
                for start in (0..n).step_by(len) {
                    for k in 0..len / 2 {
                        let (wr, wi) = self.tw[k * step];
                        let (ar, ai) = x[start + k];
                        let (br, bi) = x[start + k + len / 2];
                        let (tr, ti) = (br * wr - bi * wi, br * wi + bi * wr);
                        x[start + k] = (ar + tr, ai + ti);
                        x[start + k + len / 2] = (ar - tr, ai - ti);
                    }
                }
                len <<= 1;
            }
            return;
        }
        tmp.clear();
        tmp.extend_from_slice(x);
        for (k, out) in x.iter_mut().enumerate() {
            let (mut re, mut im) = (0.0, 0.0);
            for (j, &(xr, xi)) in tmp.iter().enumerate() {
                let (wr, wi) = self.tw[(k * j) % n];
                re += xr * wr - xi * wi;
                im += xr * wi + xi * wr;
            }
            *out = (re, im);
        }
    }
}

fn dft(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let shape = x.shape();
    let rank = shape.len();
    if rank < 2 || !(shape[rank - 1] == 1 || shape[rank - 1] == 2) {
        return Err(Error::Shape(format!("DFT input must end in a dim of 1 or 2, got {shape:?}")));
    }
    let complex_in = shape[rank - 1] == 2;
    let axis = if ctx.opset() >= 20 {
        match ctx.opt_input(inputs, 2) {
            Some(t) => t.to_i64_vec()?.first().copied().unwrap_or(-2),
            None => -2,
        }
    } else {
        ctx.attr_i("axis", 1)
    };
    let axis = crate::cpu::util::norm_axis(axis, rank)?;
    if axis == rank - 1 {
        return Err(Error::Shape("DFT axis cannot be the last (complex) dim".into()));
    }
    let inverse = ctx.attr_i("inverse", 0) != 0;
    let onesided = ctx.attr_i("onesided", 0) != 0;
    let n_in = shape[axis];
    let len = match ctx.opt_input(inputs, 1) {
        Some(t) if !t.is_empty() => {
            let l = t.to_i64_vec()?[0];
            if l <= 0 {
                return Err(Error::Shape(format!("dft_length {l} must be positive")));
            }
            l as usize
        }
        _ if inverse && onesided => 2 * n_in.saturating_sub(1),
        _ => n_in,
    };
    let v = x.to_f64_vec()?;
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..rank - 1].iter().product();
    let c = shape[rank - 1];
    let at = |o: usize, k: usize, i: usize| -> (f64, f64) {
        let base = ((o * n_in + k) * inner + i) * c;
        (v[base], if complex_in { v[base + 1] } else { 0.0 })
    };
    let plan = Dft::new(len, inverse);
    let (out_n, out_c) = match (inverse, onesided) {
        (false, true) => (len / 2 + 1, 2),
        (true, true) => (len, 1),
        _ => (len, 2),
    };
    let mut out = vec![0.0f64; outer * out_n * inner * out_c];
    let mut buf = vec![(0.0, 0.0); len];
    let mut tmp = Vec::new();
    for o in 0..outer {
        for i in 0..inner {
            if inverse && onesided {
                // Hermitian extension of the first len/2+1 bins (numpy's irfft).
                let half = len / 2 + 1;
                for (k, b) in buf.iter_mut().enumerate() {
                    let src = if k < half { k } else { len - k };
                    let (re, im) = if src < n_in { at(o, src, i) } else { (0.0, 0.0) };
                    let im = if (k == 0) || (len % 2 == 0 && k == len / 2) { 0.0 } else { im };
                    *b = if k < half { (re, im) } else { (re, -im) };
                }
            } else {
                for (k, b) in buf.iter_mut().enumerate() {
                    *b = if k < n_in { at(o, k, i) } else { (0.0, 0.0) };
                }
            }
            plan.run(&mut buf, &mut tmp);
            let norm = if inverse { 1.0 / len as f64 } else { 1.0 };
            for (k, &(re, im)) in buf.iter().enumerate().take(out_n) {
                let base = ((o * out_n + k) * inner + i) * out_c;
                out[base] = re * norm;
                if out_c == 2 {
                    out[base + 1] = im * norm;
                }
            }
        }
    }
    let mut oshape = shape.to_vec();
    oshape[axis] = out_n;
    oshape[rank - 1] = out_c;
    Ok(vec![f64_tensor(x.dtype(), &oshape, out)?])
}

fn stft(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (batch, sig_len, c) = match *x.shape() {
        [b, l, c] if c == 1 || c == 2 => (b, l, c),
        _ => return Err(Error::Shape(format!("STFT signal must be [batch, length, 1|2], got {:?}", x.shape()))),
    };
    let step = ctx.input(inputs, 1)?.to_i64_vec()?.first().copied().unwrap_or(0);
    if step <= 0 {
        return Err(Error::Shape(format!("frame_step {step} must be positive")));
    }
    let step = step as usize;
    let window = ctx.opt_input(inputs, 2).filter(|t| !t.is_empty()).map(|t| t.to_f64_vec()).transpose()?;
    let flen = match ctx.opt_input(inputs, 3).filter(|t| !t.is_empty()) {
        Some(t) => t.to_i64_vec()?[0] as usize,
        None => window.as_ref().map_or(sig_len, |w| w.len()),
    };
    if let Some(w) = &window {
        if w.len() != flen {
            return Err(Error::Shape(format!("window of {} for frame length {flen}", w.len())));
        }
    }
    if flen == 0 || flen > sig_len {
        return Err(Error::Shape(format!("frame length {flen} invalid for signal length {sig_len}")));
    }
    let onesided = ctx.attr_i("onesided", 1) != 0;
    let frames = 1 + (sig_len - flen) / step;
    let bins = if onesided { flen / 2 + 1 } else { flen };
    let v = x.to_f64_vec()?;
    let plan = Dft::new(flen, false);
    let mut out = vec![0.0f64; batch * frames * bins * 2];
    let mut buf = vec![(0.0, 0.0); flen];
    let mut tmp = Vec::new();
    for b in 0..batch {
        for f in 0..frames {
            for (k, e) in buf.iter_mut().enumerate() {
                let base = (b * sig_len + f * step + k) * c;
                let w = window.as_ref().map_or(1.0, |w| w[k]);
                *e = (v[base] * w, if c == 2 { v[base + 1] * w } else { 0.0 });
            }
            plan.run(&mut buf, &mut tmp);
            for (k, &(re, im)) in buf.iter().enumerate().take(bins) {
                let o = ((b * frames + f) * bins + k) * 2;
                out[o] = re;
                out[o + 1] = im;
            }
        }
    }
    Ok(vec![f64_tensor(x.dtype(), &[batch, frames, bins, 2], out)?])
}

// ---------------------------------------------------------------------------------------------
// Window functions and the mel filter bank
// ---------------------------------------------------------------------------------------------

fn out_dtype(ctx: &OpCtx) -> Result<DType> {
    let code = ctx.attr_i("output_datatype", DType::F32 as i64);
    DType::from_onnx(code as i32).ok_or_else(|| ctx.unsupported(format!("output_datatype {code}")))
}

/// f64 values as a tensor of any real or integer dtype (integers truncate, as numpy's astype).
fn cast_f64(dt: DType, shape: &[usize], v: Vec<f64>) -> Result<Tensor> {
    if dt.is_float() {
        return f64_tensor(dt, shape, v);
    }
    let t = Tensor::from_vec(shape, v.into_iter().map(|x| x as i64).collect::<Vec<_>>())?;
    match dt {
        DType::I64 => Ok(t),
        DType::I32 => Tensor::from_vec(shape, t.view::<i64>()?.iter().map(|&x| x as i32).collect()),
        DType::I16 => Tensor::from_vec(shape, t.view::<i64>()?.iter().map(|&x| x as i16).collect()),
        DType::I8 => Tensor::from_vec(shape, t.view::<i64>()?.iter().map(|&x| x as i8).collect()),
        DType::U8 => Tensor::from_vec(shape, t.view::<i64>()?.iter().map(|&x| x as u8).collect()),
        DType::U16 => Tensor::from_vec(shape, t.view::<i64>()?.iter().map(|&x| x as u16).collect()),
        DType::U32 => Tensor::from_vec(shape, t.view::<i64>()?.iter().map(|&x| x as u32).collect()),
        DType::U64 => Tensor::from_vec(shape, t.view::<i64>()?.iter().map(|&x| x as u64).collect()),
        d => Err(Error::DType(format!("cannot produce {d} here"))),
    }
}

fn window(ctx: &OpCtx, inputs: &[Option<Tensor>], f: impl Fn(f64, f64) -> f64) -> Result<Vec<Tensor>> {
    let size = ctx.input(inputs, 0)?.to_i64_vec()?.first().copied().unwrap_or(0);
    if size < 0 {
        return Err(Error::Shape(format!("window size {size} is negative")));
    }
    let size = size as usize;
    let periodic = ctx.attr_i("periodic", 1) != 0;
    let denom = if periodic { size as f64 } else { size as f64 - 1.0 };
    let v: Vec<f64> = (0..size).map(|n| f(n as f64, denom)).collect();
    Ok(vec![cast_f64(out_dtype(ctx)?, &[size], v)?])
}

fn hann_window(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    use std::f64::consts::PI;
    window(ctx, inputs, |n, d| (PI * n / d).sin().powi(2))
}

fn hamming_window(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    use std::f64::consts::PI;
    let alpha = 25.0 / 46.0;
    window(ctx, inputs, move |n, d| alpha - (1.0 - alpha) * (2.0 * PI * n / d).cos())
}

fn blackman_window(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    use std::f64::consts::PI;
    window(ctx, inputs, |n, d| 0.42 - 0.5 * (2.0 * PI * n / d).cos() + 0.08 * (4.0 * PI * n / d).cos())
}

fn mel_weight_matrix(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let int = |i: usize| -> Result<i64> {
        ctx.input(inputs, i)?.to_i64_vec()?.first().copied().ok_or_else(|| Error::Shape(format!("input {i} is empty")))
    };
    let flt = |i: usize| -> Result<f64> {
        ctx.input(inputs, i)?.to_f64_vec()?.first().copied().ok_or_else(|| Error::Shape(format!("input {i} is empty")))
    };
    let (mels, dft_len, rate) = (int(0)?, int(1)?, int(2)?);
    let (lo, hi) = (flt(3)?, flt(4)?);
    if mels <= 0 || dft_len <= 0 || rate <= 0 {
        return Err(Error::Shape("num_mel_bins, dft_length and sample_rate must be positive".into()));
    }
    let (mels, spec_bins) = (mels as usize, dft_len as usize / 2 + 1);
    // Mel edges in the input's (f32) precision, the rest in f64, as the reference computes.
    let to_mel = |f: f64| (2595.0 * (1.0 + (f as f32) / 700.0).log10()) as f64;
    let (lo_mel, hi_mel) = (to_mel(lo), to_mel(hi));
    let mel_step = ((hi_mel - lo_mel) as f32 / (mels + 2) as f32) as f64;
    let points: Vec<i64> = (0..mels + 2)
        .map(|i| {
            let m = i as f64 * mel_step + lo_mel;
            let hz = 700.0 * (10f64.powf(m / 2595.0) - 1.0);
            (((dft_len + 1) as f64 * hz) / rate as f64).floor() as i64
        })
        .collect();
    let mut out = vec![0.0f64; spec_bins * mels];
    let mut set = |j: i64, i: usize, v: f64| -> Result<()> {
        if j < 0 || j as usize >= spec_bins {
            return Err(Error::Shape(format!("mel edge bin {j} is outside the {spec_bins} spectrogram bins")));
        }
        out[j as usize * mels + i] = v;
        Ok(())
    };
    for i in 0..mels {
        let (l, c, h) = (points[i], points[i + 1], points[i + 2]);
        if c == l {
            set(c, i, 1.0)?;
        } else {
            for j in l..=c {
                set(j, i, (j - l) as f64 / (c - l) as f64)?;
            }
        }
        if h > c {
            for j in c..h {
                set(j, i, (h - j) as f64 / (h - c) as f64)?;
            }
        }
    }
    Ok(vec![cast_f64(out_dtype(ctx)?, &[spec_bins, mels], out)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, Step};

    fn run(op: &str, opset: i64, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Vec<Tensor> {
        let s = Step { op: op.into(), opset, attrs, outputs: vec![0, 1, 2, 3], ..Default::default() };
        let k = match crate::cpu::registry().get("", op) {
            Some(crate::cpu::Kernel::Tensor(k)) => k,
            _ => panic!("no kernel"),
        };
        k(&OpCtx::new(&s, None), &inputs).unwrap()
    }

    fn t(shape: &[usize], v: &[f32]) -> Option<Tensor> {
        Some(Tensor::from_vec(shape, v.to_vec()).unwrap())
    }

    fn int(name: &str, i: i64) -> Attr {
        Attr { name: name.into(), i, ..Default::default() }
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn attention_causal_two_tokens() {
        // One head, head size 1, q = k = 0 everywhere: uniform weights over the visible keys.
        let q = t(&[1, 1, 2, 1], &[0., 0.]);
        let k = t(&[1, 1, 2, 1], &[0., 0.]);
        let v = t(&[1, 1, 2, 1], &[2., 4.]);
        let out = run("Attention", 23, vec![int("is_causal", 1)], vec![q, k, v]);
        close(out[0].view::<f32>().unwrap(), &[2., 3.]);
        // qk_matmul_output mode 0: the scaled scores before the causal mask.
        close(out[3].view::<f32>().unwrap(), &[0.; 4]);
    }

    #[test]
    fn attention_qk_softmax_output_and_bool_mask() {
        let q = t(&[1, 1, 1, 1], &[1.]);
        let k = t(&[1, 1, 2, 1], &[1., 1.]);
        let v = t(&[1, 1, 2, 1], &[10., 20.]);
        let mask = Some(Tensor::from_vec(&[1, 2], vec![false, true]).unwrap());
        let out = run("Attention", 23, vec![int("qk_matmul_output_mode", 3)], vec![q, k, v, mask]);
        close(out[0].view::<f32>().unwrap(), &[20.]);
        close(out[3].view::<f32>().unwrap(), &[0., 1.]);
    }

    #[test]
    fn nms_suppresses_overlap() {
        // Boxes 0 and 1 overlap heavily (IoU 0.81); box 2 is apart.
        let boxes = t(&[1, 3, 4], &[0., 0., 1., 1., 0., 0.1, 1., 1.1, 0., 10., 1., 11.]);
        let scores = t(&[1, 1, 3], &[0.9, 0.95, 0.5]);
        let out = run(
            "NonMaxSuppression",
            11,
            vec![],
            vec![boxes, scores, Some(Tensor::scalar(3i64)), Some(Tensor::scalar(0.5f32)), None],
        );
        assert_eq!(out[0].view::<i64>().unwrap(), &[0, 0, 1, 0, 0, 2]);
    }

    #[test]
    fn det_and_nll() {
        let out = run("Det", 11, vec![], vec![t(&[2, 2, 2], &[1., 2., 3., 4., 2., 0., 0., 3.])]);
        close(out[0].view::<f32>().unwrap(), &[-2., 6.]);
        let x = t(&[2, 3], &[-1., -2., -3., -4., -5., -6.]);
        let target = Some(Tensor::from_vec(&[2], vec![2i64, 0]).unwrap());
        let out = run("NegativeLogLikelihoodLoss", 13, vec![], vec![x, target]);
        close(out[0].view::<f32>().unwrap(), &[3.5]);
    }

    #[test]
    fn dft_of_impulse_and_round_trip() {
        // DFT of [1, 0, 0] is all ones; length 4 (radix-2 path) and 3 (direct path).
        for n in [3usize, 4] {
            let mut x = vec![0f32; n];
            x[0] = 1.0;
            let out = run("DFT", 17, vec![], vec![t(&[1, n, 1], &x)]);
            let v = out[0].view::<f32>().unwrap();
            for k in 0..n {
                close(&v[2 * k..2 * k + 2], &[1., 0.]);
            }
            let back = run("DFT", 17, vec![int("inverse", 1)], vec![Some(out[0].clone())]);
            let b = back[0].view::<f32>().unwrap();
            for k in 0..n {
                close(&b[2 * k..2 * k + 2], &[x[k], 0.]);
            }
        }
    }

    #[test]
    fn hann_window_periodic() {
        let out = run("HannWindow", 17, vec![], vec![Some(Tensor::scalar(4i64))]);
        close(out[0].view::<f32>().unwrap(), &[0., 0.5, 1., 0.5]);
    }
}
