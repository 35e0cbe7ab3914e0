//! Recurrent layers: LSTM, GRU and RNN (every direction, optional input, activation and layout).
//!
//! Each direction runs in f32: the input projection of all timesteps is one matrix product done up
//! front (bias in its epilogue), then every step adds H·Rᵀ. R is `[gates·hidden, hidden]`, so
//! H·Rᵀ is a set of contiguous dot products: the GEMM's skinny path reads R in place (no transpose,
//! no packing) when at most a few rows are stepped together; larger batches pack R once per call.
//! Sigmoid and tanh gates use the GEMM epilogue's vectorized functions.

use std::borrow::Cow;

use kiln_runtime::{DType, Error, Result, Tensor};
use crate::cpu::ctx::OpCtx;
use crate::cpu::gemm::{self, BRef, Epilogue, MatRef, PackedB};
use crate::cpu::registry::Registry;

pub fn register(r: &mut Registry) {
    r.add("LSTM", lstm);
    r.add("GRU", gru);
    r.add("RNN", rnn);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cell {
    Lstm,
    Gru,
    Rnn,
}

impl Cell {
    fn gates(self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
            Cell::Rnn => 1,
        }
    }

    fn default_acts(self) -> &'static [&'static str] {
        match self {
            Cell::Lstm => &["Sigmoid", "Tanh", "Tanh"],
            Cell::Gru => &["Sigmoid", "Tanh"],
            Cell::Rnn => &["Tanh"],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Act {
    Sigmoid,
    Tanh,
    Relu,
    LeakyRelu(f32),
    ThresholdedRelu(f32),
    ScaledTanh(f32, f32),
    HardSigmoid(f32, f32),
    Elu(f32),
    Softsign,
    Softplus,
    Affine(f32, f32),
}

impl Act {
    /// Parse the activation list, consuming activation_alpha / activation_beta in order by the
    /// activations that take them (onnxruntime's convention); missing values take the op defaults.
    fn parse_list(ctx: &OpCtx, names: &[String]) -> Result<Vec<Act>> {
        let alphas = ctx.attr_floats("activation_alpha").unwrap_or_default();
        let betas = ctx.attr_floats("activation_beta").unwrap_or_default();
        let (mut ai, mut bi) = (0, 0);
        let next = |v: &[f32], i: &mut usize, d: f32| {
            let r = v.get(*i).copied().unwrap_or(d);
            *i += 1;
            r
        };
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            let a = match n.to_ascii_lowercase().as_str() {
                "sigmoid" => Act::Sigmoid,
                "tanh" => Act::Tanh,
                "relu" => Act::Relu,
                "leakyrelu" => Act::LeakyRelu(next(&alphas, &mut ai, 0.01)),
                "thresholdedrelu" => Act::ThresholdedRelu(next(&alphas, &mut ai, 1.0)),
                "scaledtanh" => {
                    let a = next(&alphas, &mut ai, 1.0);
                    Act::ScaledTanh(a, next(&betas, &mut bi, 1.0))
                }
                "hardsigmoid" => {
                    let a = next(&alphas, &mut ai, 0.2);
                    Act::HardSigmoid(a, next(&betas, &mut bi, 0.5))
                }
                "elu" => Act::Elu(next(&alphas, &mut ai, 1.0)),
                "softsign" => Act::Softsign,
                "softplus" => Act::Softplus,
                "affine" => {
                    let a = next(&alphas, &mut ai, 1.0);
                    Act::Affine(a, next(&betas, &mut bi, 0.0))
                }
                other => return Err(ctx.unsupported(format!("activation '{other}'"))),
            };
            out.push(a);
        }
        Ok(out)
    }

    /// Apply in place, clipping the inputs to [-clip, clip] first when a clip is set.
    fn apply(self, v: &mut [f32], clip: Option<f32>) {
        if let Some(c) = clip {
            for x in v.iter_mut() {
                *x = x.clamp(-c, c);
            }
        }
        match self {
            Act::Sigmoid => gemm::act_in_place(v, gemm::Act::Sigmoid),
            Act::Tanh => gemm::act_in_place(v, gemm::Act::Tanh),
            Act::Relu => gemm::act_in_place(v, gemm::Act::Relu),
            Act::LeakyRelu(a) => gemm::act_in_place(v, gemm::Act::LeakyRelu(a)),
            Act::ThresholdedRelu(a) => v.iter_mut().for_each(|x| *x = if *x > a { *x } else { 0.0 }),
            Act::ScaledTanh(a, b) => {
                v.iter_mut().for_each(|x| *x *= b);
                gemm::act_in_place(v, gemm::Act::Tanh);
                v.iter_mut().for_each(|x| *x *= a);
            }
            Act::HardSigmoid(a, b) => gemm::act_in_place(v, gemm::Act::HardSigmoid(a, b)),
            Act::Elu(a) => v.iter_mut().for_each(|x| *x = if *x < 0.0 { a * (x.exp() - 1.0) } else { *x }),
            Act::Softsign => v.iter_mut().for_each(|x| *x /= 1.0 + x.abs()),
            Act::Softplus => v.iter_mut().for_each(|x| {
                // ln(1 + e^x) without overflow for large x.
                *x = if *x > 20.0 { *x } else { x.exp().ln_1p() }
            }),
            Act::Affine(a, b) => v.iter_mut().for_each(|x| *x = a * *x + b),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small dense helpers
// ---------------------------------------------------------------------------------------------

/// Rows `r0..r1` of a recurrence weight R (`[gates·hidden, hidden]`), as the B operand of
/// `gates += H·Rᵀ`: read in place by the skinny GEMM for a few rows of H, packed once otherwise.
struct RecurW<'a> {
    r: &'a [f32],
    hs: usize,
    n: usize,
    packed: Option<PackedB>,
}

impl<'a> RecurW<'a> {
    fn new(r: &'a [f32], hs: usize, r0: usize, r1: usize, rows_at_once: usize) -> Result<RecurW<'a>> {
        let r = &r[r0 * hs..r1 * hs];
        let n = r1 - r0;
        let packed = if rows_at_once > gemm::SKINNY_M {
            Some(PackedB::for_active(MatRef::cols(r, hs), hs, n)?)
        } else {
            None
        };
        Ok(RecurW { r, hs, n, packed })
    }

    /// `out[i, ..n] += h[i, ..]·Rᵀ` for the `m` rows of `h` (out rows `ldo` apart).
    fn acc(&self, m: usize, h: &[f32], out: &mut [f32], ldo: usize) -> Result<()> {
        let b = match &self.packed {
            Some(p) => BRef::Packed(p),
            None => BRef::Mat(MatRef::cols(self.r, self.hs)),
        };
        gemm::sgemm(m, self.n, self.hs, MatRef::rows(h, self.hs), b, out, ldo, true, &Epilogue::NONE, false)
    }
}

/// Any float tensor's elements as f32 (borrowed when already f32).
fn as_f32(t: &Tensor) -> Result<Cow<'_, [f32]>> {
    match t.dtype() {
        DType::F32 => Ok(Cow::Borrowed(t.view::<f32>()?)),
        DType::F64 | DType::F16 | DType::BF16 => {
            Ok(Cow::Owned(t.to_f64_vec()?.into_iter().map(|v| v as f32).collect()))
        }
        d => Err(Error::DType(format!("recurrent layers take float inputs, got {d}"))),
    }
}

fn to_dtype(v: Vec<f32>, shape: &[usize], dt: DType) -> Result<Tensor> {
    match dt {
        DType::F32 => Tensor::from_vec(shape, v),
        DType::F64 => Tensor::from_vec(shape, v.into_iter().map(|x| x as f64).collect()),
        DType::F16 => Tensor::from_vec(shape, v.into_iter().map(half::f16::from_f32).collect()),
        DType::BF16 => Tensor::from_vec(shape, v.into_iter().map(half::bf16::from_f32).collect()),
        d => Err(Error::DType(format!("recurrent layers take float inputs, got {d}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// One direction
// ---------------------------------------------------------------------------------------------

struct Cfg {
    cell: Cell,
    seq: usize,
    batch: usize,
    input: usize,
    hidden: usize,
    clip: Option<f32>,
    input_forget: bool,
    linear_before_reset: bool,
}

/// Weights of one direction (slices of the op's inputs).
struct DirWeights<'a> {
    w: &'a [f32],
    r: &'a [f32],
    b: Option<&'a [f32]>,
    p: Option<&'a [f32]>,
    h0: Option<Vec<f32>>,
    c0: Option<Vec<f32>>,
    acts: &'a [Act],
}

struct DirOut {
    /// [seq, batch, hidden]
    y: Vec<f32>,
    /// [batch, hidden]
    h: Vec<f32>,
    c: Vec<f32>,
}

fn run_direction(cfg: &Cfg, x: &[f32], dw: &DirWeights, lens: &[usize], reverse: bool) -> Result<DirOut> {
    let (seq, batch, hs) = (cfg.seq, cfg.batch, cfg.hidden);
    let g = cfg.cell.gates();
    let gh = g * hs;
    // Input projection of every timestep, with the biases that sit outside the recurrence.
    let bias: Option<Vec<f32>> = dw.b.map(|b| {
        let (wb, rb) = b.split_at(gh);
        let mut bias: Vec<f32> = wb.iter().zip(rb).map(|(a, b)| a + b).collect();
        if cfg.cell == Cell::Gru && cfg.linear_before_reset {
            // Rbh is applied inside r ⊙ (H·Rhᵀ + Rbh).
            bias[2 * hs..].copy_from_slice(&wb[2 * hs..]);
        }
        bias
    });
    // xp = X · Wᵀ + bias for every timestep at once (W is [gates*hidden, input], read transposed).
    let mut xp = vec![0.0f32; seq * batch * gh];
    let epi = Epilogue::new(bias.as_deref(), gemm::Act::None);
    let (xm, wm) = (MatRef::rows(x, cfg.input), MatRef::cols(dw.w, cfg.input));
    gemm::sgemm(seq * batch, gh, cfg.input, xm, BRef::Mat(wm), &mut xp, gh, false, &epi, true)?;

    // All entries step together when their lengths agree (the usual case); otherwise one by one.
    let together = lens.iter().all(|&l| l == lens[0]);
    let rows_at_once = if together { batch } else { 1 };
    // GRU: z/r see H·Rᵀ directly; the candidate's recurrent part (rows 2h..3h of R) depends on r.
    let rec_rows = if cfg.cell == Cell::Gru { 2 * hs } else { gh };
    let rw = RecurW::new(dw.r, hs, 0, rec_rows, rows_at_once)?;
    let rw_h = if cfg.cell == Cell::Gru { Some(RecurW::new(dw.r, hs, 2 * hs, gh, 1)?) } else { None };
    let rbh: Option<&[f32]> = match (cfg.cell, cfg.linear_before_reset, dw.b) {
        (Cell::Gru, true, Some(b)) => Some(&b[gh + 2 * hs..2 * gh]),
        _ => None,
    };

    let mut h = dw.h0.clone().unwrap_or_else(|| vec![0.0; batch * hs]);
    let mut c = dw.c0.clone().unwrap_or_else(|| vec![0.0; batch * hs]);
    let mut y = vec![0.0f32; seq * batch * hs];
    let mut gates = vec![0.0f32; batch * gh];
    let mut tmp = vec![0.0f32; hs];
    let mut rh = vec![0.0f32; hs];
    let steps = lens.iter().copied().max().unwrap_or(0);
    for s in 0..steps {
        let mut bi = 0;
        while bi < batch {
            let len = lens[bi];
            let rows = if together { batch } else { 1 };
            if s >= len {
                bi += rows;
                continue;
            }
            let t = if reverse { len - 1 - s } else { s };
            // Rows bi..bi+rows of this timestep are contiguous in xp, h, c and y.
            let (r0, r1) = (t * batch + bi, t * batch + bi + rows);
            let gates = &mut gates[..rows * gh];
            gates.copy_from_slice(&xp[r0 * gh..r1 * gh]);
            let hb = &mut h[bi * hs..(bi + rows) * hs];
            rw.acc(rows, hb, gates, gh)?;
            let cb = &mut c[bi * hs..(bi + rows) * hs];
            for ((gr, hr), cr) in gates.chunks_exact_mut(gh).zip(hb.chunks_exact_mut(hs)).zip(cb.chunks_exact_mut(hs)) {
                match cfg.cell {
                    Cell::Lstm => lstm_cell(cfg, dw, gr, hr, cr),
                    Cell::Rnn => {
                        dw.acts[0].apply(gr, cfg.clip);
                        hr.copy_from_slice(gr);
                    }
                    Cell::Gru => {
                        let rw_h = rw_h.as_ref().expect("GRU has a candidate weight");
                        gru_cell(cfg, dw, rw_h, rbh, gr, hr, &mut tmp, &mut rh)?;
                    }
                }
            }
            y[r0 * hs..r1 * hs].copy_from_slice(hb);
            bi += rows;
        }
    }
    for (bi, &len) in lens.iter().enumerate() {
        if len == 0 {
            // Nothing ran for this entry: its final state is zero (onnxruntime's convention).
            h[bi * hs..(bi + 1) * hs].fill(0.0);
            c[bi * hs..(bi + 1) * hs].fill(0.0);
        }
    }
    Ok(DirOut { y, h, c })
}

fn lstm_cell(cfg: &Cfg, dw: &DirWeights, gates: &mut [f32], h: &mut [f32], c: &mut [f32]) {
    let hs = cfg.hidden;
    let (f_act, g_act, h_act) = (dw.acts[0], dw.acts[1], dw.acts[2]);
    let (gi, rest) = gates.split_at_mut(hs);
    let (go, rest) = rest.split_at_mut(hs);
    let (gf, gc) = rest.split_at_mut(hs);
    if let Some(p) = dw.p {
        let (pi, pf) = (&p[..hs], &p[2 * hs..3 * hs]);
        for k in 0..hs {
            gi[k] += pi[k] * c[k];
            gf[k] += pf[k] * c[k];
        }
    }
    f_act.apply(gi, cfg.clip);
    if cfg.input_forget {
        for k in 0..hs {
            gf[k] = 1.0 - gi[k];
        }
    } else {
        f_act.apply(gf, cfg.clip);
    }
    g_act.apply(gc, cfg.clip);
    for k in 0..hs {
        c[k] = gf[k] * c[k] + gi[k] * gc[k];
    }
    if let Some(p) = dw.p {
        let po = &p[hs..2 * hs];
        for k in 0..hs {
            go[k] += po[k] * c[k];
        }
    }
    f_act.apply(go, cfg.clip);
    // h(C) goes through the scratch gate row so C itself stays intact.
    gc.copy_from_slice(c);
    h_act.apply(gc, None);
    for k in 0..hs {
        h[k] = go[k] * gc[k];
    }
}

#[allow(clippy::too_many_arguments)]
fn gru_cell(
    cfg: &Cfg,
    dw: &DirWeights,
    rw_h: &RecurW,
    rbh: Option<&[f32]>,
    gates: &mut [f32],
    h: &mut [f32],
    tmp: &mut [f32],
    rh: &mut [f32],
) -> Result<()> {
    let hs = cfg.hidden;
    let (f_act, g_act) = (dw.acts[0], dw.acts[1]);
    let (zr, gh_part) = gates.split_at_mut(2 * hs);
    f_act.apply(zr, cfg.clip);
    let (z, r) = zr.split_at(hs);
    // rh = (r ⊙ H)·Rhᵀ (default) or r ⊙ (H·Rhᵀ + Rbh) (linear_before_reset).
    rh.fill(0.0);
    if cfg.linear_before_reset {
        rw_h.acc(1, h, rh, hs)?;
        if let Some(b) = rbh {
            for (o, &bv) in rh.iter_mut().zip(b) {
                *o += bv;
            }
        }
        for k in 0..hs {
            rh[k] *= r[k];
        }
    } else {
        for k in 0..hs {
            tmp[k] = r[k] * h[k];
        }
        rw_h.acc(1, tmp, rh, hs)?;
    }
    for k in 0..hs {
        gh_part[k] += rh[k];
    }
    g_act.apply(gh_part, cfg.clip);
    for k in 0..hs {
        h[k] = (1.0 - z[k]) * gh_part[k] + z[k] * h[k];
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The op
// ---------------------------------------------------------------------------------------------

fn recurrent(ctx: &OpCtx, inputs: &[Option<Tensor>], cell: Cell) -> Result<Vec<Tensor>> {
    let xt = ctx.input(inputs, 0)?;
    let wt = ctx.input(inputs, 1)?;
    let rt = ctx.input(inputs, 2)?;
    let dt = xt.dtype();
    let layout = ctx.attr_i("layout", 0);
    if layout != 0 && layout != 1 {
        return Err(ctx.unsupported(format!("layout {layout}")));
    }
    if xt.rank() != 3 || wt.rank() != 3 || rt.rank() != 3 {
        return Err(Error::Shape(format!(
            "X, W, R must be 3-D, got {:?}, {:?}, {:?}",
            xt.shape(),
            wt.shape(),
            rt.shape()
        )));
    }
    let (seq, batch) = if layout == 0 {
        (xt.shape()[0], xt.shape()[1])
    } else {
        (xt.shape()[1], xt.shape()[0])
    };
    let input = xt.shape()[2];
    let g = cell.gates();
    let hidden = rt.shape()[2];
    if let Some(hsz) = ctx.attr_i_opt("hidden_size") {
        if hsz as usize != hidden {
            return Err(Error::Shape(format!("hidden_size {hsz} disagrees with R's shape {:?}", rt.shape())));
        }
    }
    let direction = ctx.attr_s("direction", "forward");
    let nd = match direction.as_str() {
        "forward" | "reverse" => 1,
        "bidirectional" => 2,
        d => return Err(ctx.unsupported(format!("direction '{d}'"))),
    };
    if wt.shape() != [nd, g * hidden, input] || rt.shape() != [nd, g * hidden, hidden] {
        return Err(Error::Shape(format!(
            "W {:?} / R {:?} do not match {nd} direction(s), {g} gates, hidden {hidden}, input {input}",
            wt.shape(),
            rt.shape()
        )));
    }
    let x = as_f32(xt)?;
    let w = as_f32(wt)?;
    let r = as_f32(rt)?;
    let b = match ctx.opt_input(inputs, 3) {
        Some(t) if !t.is_empty() => {
            if t.shape() != [nd, 2 * g * hidden] {
                return Err(Error::Shape(format!("B has shape {:?}", t.shape())));
            }
            Some(as_f32(t)?)
        }
        _ => None,
    };
    let lens: Vec<usize> = match ctx.opt_input(inputs, 4) {
        Some(t) if !t.is_empty() => {
            let v = t.to_i64_vec()?;
            if v.len() != batch || v.iter().any(|&l| l < 0 || l as usize > seq) {
                return Err(Error::Shape(format!("sequence_lens {v:?} invalid for batch {batch}, seq {seq}")));
            }
            v.into_iter().map(|l| l as usize).collect()
        }
        _ => vec![seq; batch],
    };
    // initial_h / initial_c: [nd, batch, hidden], or [batch, nd, hidden] with layout 1.
    let state = |i: usize| -> Result<Option<Vec<Vec<f32>>>> {
        let Some(t) = ctx.opt_input(inputs, i).filter(|t| !t.is_empty()) else { return Ok(None) };
        let want = if layout == 0 { [nd, batch, hidden] } else { [batch, nd, hidden] };
        if t.shape() != want {
            return Err(Error::Shape(format!("initial state has shape {:?}, expected {want:?}", t.shape())));
        }
        let v = as_f32(t)?;
        Ok(Some(
            (0..nd)
                .map(|d| {
                    let mut o = Vec::with_capacity(batch * hidden);
                    for bi in 0..batch {
                        let off = if layout == 0 { (d * batch + bi) * hidden } else { (bi * nd + d) * hidden };
                        o.extend_from_slice(&v[off..off + hidden]);
                    }
                    o
                })
                .collect(),
        ))
    };
    let h0 = state(5)?;
    let (c0, p) = if cell == Cell::Lstm {
        let p = match ctx.opt_input(inputs, 7) {
            Some(t) if !t.is_empty() => {
                if t.shape() != [nd, 3 * hidden] {
                    return Err(Error::Shape(format!("P has shape {:?}", t.shape())));
                }
                Some(as_f32(t)?)
            }
            _ => None,
        };
        (state(6)?, p)
    } else {
        (None, None)
    };

    let per_dir = cell.default_acts().len();
    let names: Vec<String> = match ctx.attr_strings("activations") {
        Some(v) if !v.is_empty() => v,
        _ => cell.default_acts().iter().map(|s| s.to_string()).collect(),
    };
    let mut acts = Act::parse_list(ctx, &names)?;
    if acts.len() == per_dir && nd == 2 {
        acts.extend_from_within(..);
    }
    if acts.len() != per_dir * nd {
        return Err(Error::Other(format!("{} activations given, {} expected", acts.len(), per_dir * nd)));
    }
    let clip = ctx.attr_f_opt("clip").filter(|c| *c > 0.0);
    let cfg = Cfg {
        cell,
        seq,
        batch,
        input,
        hidden,
        clip,
        input_forget: ctx.attr_i("input_forget", 0) != 0,
        linear_before_reset: ctx.attr_i("linear_before_reset", 0) != 0,
    };

    // Time-major X.
    let xs: Cow<[f32]> = if layout == 0 {
        Cow::Borrowed(&x[..])
    } else {
        let mut v = vec![0.0f32; x.len()];
        for bi in 0..batch {
            for t in 0..seq {
                let src = (bi * seq + t) * input;
                let dst = (t * batch + bi) * input;
                v[dst..dst + input].copy_from_slice(&x[src..src + input]);
            }
        }
        Cow::Owned(v)
    };

    let gh = g * hidden;
    let outs: Vec<DirOut> = (0..nd)
        .map(|d| {
            let dw = DirWeights {
                w: &w[d * gh * input..(d + 1) * gh * input],
                r: &r[d * gh * hidden..(d + 1) * gh * hidden],
                b: b.as_ref().map(|b| &b[d * 2 * gh..(d + 1) * 2 * gh]),
                p: p.as_ref().map(|p| &p[d * 3 * hidden..(d + 1) * 3 * hidden]),
                h0: h0.as_ref().map(|v| v[d].clone()),
                c0: c0.as_ref().map(|v| v[d].clone()),
                acts: &acts[d * per_dir..(d + 1) * per_dir],
            };
            let reverse = direction == "reverse" || d == 1;
            run_direction(&cfg, &xs, &dw, &lens, reverse)
        })
        .collect::<Result<_>>()?;

    // Assemble Y and the final states in the requested layout.
    let mut y = vec![0.0f32; seq * nd * batch * hidden];
    let mut yh = vec![0.0f32; nd * batch * hidden];
    let mut yc = vec![0.0f32; nd * batch * hidden];
    for (d, o) in outs.iter().enumerate() {
        for t in 0..seq {
            for bi in 0..batch {
                let src = (t * batch + bi) * hidden;
                let dst = if layout == 0 {
                    ((t * nd + d) * batch + bi) * hidden
                } else {
                    ((bi * seq + t) * nd + d) * hidden
                };
                y[dst..dst + hidden].copy_from_slice(&o.y[src..src + hidden]);
            }
        }
        for bi in 0..batch {
            let src = bi * hidden;
            let dst = if layout == 0 { (d * batch + bi) * hidden } else { (bi * nd + d) * hidden };
            yh[dst..dst + hidden].copy_from_slice(&o.h[src..src + hidden]);
            yc[dst..dst + hidden].copy_from_slice(&o.c[src..src + hidden]);
        }
    }
    let (y_shape, s_shape) = if layout == 0 {
        (vec![seq, nd, batch, hidden], vec![nd, batch, hidden])
    } else {
        (vec![batch, seq, nd, hidden], vec![batch, nd, hidden])
    };
    let mut res = vec![to_dtype(y, &y_shape, dt)?, to_dtype(yh, &s_shape, dt)?];
    if cell == Cell::Lstm {
        res.push(to_dtype(yc, &s_shape, dt)?);
    }
    Ok(res)
}

fn lstm(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    recurrent(c, i, Cell::Lstm)
}
fn gru(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    recurrent(c, i, Cell::Gru)
}
fn rnn(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    recurrent(c, i, Cell::Rnn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, Step};

    fn run(op: &str, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Vec<Tensor> {
        let s = Step { op: op.into(), opset: 22, attrs, ..Default::default() };
        let k = match crate::cpu::registry().get("", op) {
            Some(crate::cpu::Kernel::Tensor(k)) => k,
            _ => panic!("no kernel"),
        };
        k(&OpCtx::new(&s, None), &inputs).unwrap()
    }

    fn t(shape: &[usize], v: &[f32]) -> Option<Tensor> {
        Some(Tensor::from_vec(shape, v.to_vec()).unwrap())
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn rnn_two_steps() {
        let out = run(
            "RNN",
            vec![],
            vec![t(&[2, 1, 1], &[1., -1.]), t(&[1, 1, 1], &[2.]), t(&[1, 1, 1], &[0.5]), t(&[1, 2], &[0.1, 0.2])],
        );
        let h1 = 2.3f32.tanh();
        let h2 = (-2.0 + 0.5 * h1 + 0.3f32).tanh();
        close(out[0].view::<f32>().unwrap(), &[h1, h2]);
        close(out[1].view::<f32>().unwrap(), &[h2]);
    }

    #[test]
    fn lstm_zero_weights_decays_cell_and_honours_lengths() {
        // All gates are sigmoid(0) = 0.5 and the candidate tanh(0) = 0, so C halves each step.
        let z = |n: usize| vec![0.0f32; n];
        let lens = Some(Tensor::from_vec(&[2], vec![2i32, 1]).unwrap());
        let out = run(
            "LSTM",
            vec![],
            vec![
                t(&[2, 2, 1], &z(4)),
                t(&[1, 4, 1], &z(4)),
                t(&[1, 4, 1], &z(4)),
                None,
                lens,
                None,
                t(&[1, 2, 1], &[1.0, 1.0]),
            ],
        );
        let h = |c: f32| 0.5 * c.tanh();
        close(out[0].view::<f32>().unwrap(), &[h(0.5), h(0.5), h(0.25), 0.0]);
        close(out[1].view::<f32>().unwrap(), &[h(0.25), h(0.5)]);
        close(out[2].view::<f32>().unwrap(), &[0.25, 0.5]);
    }

    #[test]
    fn gru_bidirectional_shapes() {
        let dir = Attr { name: "direction".into(), s: b"bidirectional".to_vec(), ..Default::default() };
        let out = run(
            "GRU",
            vec![dir],
            vec![t(&[3, 2, 4], &[0.1; 24]), t(&[2, 6, 4], &[0.2; 48]), t(&[2, 6, 2], &[0.3; 24])],
        );
        assert_eq!(out[0].shape(), &[3, 2, 2, 2]);
        assert_eq!(out[1].shape(), &[2, 2, 2]);
        // Identical weights: both directions end in the same state after the same inputs.
        let yh = out[1].view::<f32>().unwrap();
        close(&yh[..4], &yh[4..]);
    }
}
