//! Shapes of neural-network ops: MatMul/Gemm, convolutions and pools, normalisations, Resize,
//! recurrent layers, and a few detection / generator ops.

use super::dims::{broadcast, fixed, map_fixed, norm_axis, same_dim, sum_dims};
use super::Cx;
use crate::ir::Dim;

type Shapes = Vec<Option<Vec<Dim>>>;

pub(crate) fn shapes(cx: &Cx) -> Option<Shapes> {
    let one = |s: Option<Vec<Dim>>| Some(vec![s]);
    match cx.op() {
        "MatMul" | "MatMulInteger" => one(matmul(cx.shape(0)?, cx.shape(1)?)),
        "QLinearMatMul" => one(matmul(cx.shape(0)?, cx.shape(3)?)),
        "Gemm" => one(gemm(cx)),
        "Conv" | "ConvInteger" => one(conv(cx, 0, 1)),
        "QLinearConv" => one(conv(cx, 0, 3)),
        "DeformConv" => one(conv(cx, 0, 1)),
        "ConvTranspose" => one(conv_transpose(cx)),
        "MaxPool" => {
            let s = pool(cx);
            Some(vec![s.clone(), s])
        }
        "AveragePool" | "LpPool" => one(pool(cx)),
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => one(global_pool(cx)),
        "MaxRoiPool" => one(max_roi_pool(cx)),
        "RoiAlign" => one(roi_align(cx)),
        "MaxUnpool" => one(max_unpool(cx)),
        "LayerNormalization" => Some(layer_norm(cx)),
        "BatchNormalization" => Some(batch_norm(cx)),
        "DynamicQuantizeLinear" => Some(vec![
            cx.shape(0).map(|s| s.to_vec()),
            Some(vec![]),
            Some(vec![]),
        ]),
        "Resize" => one(resize(cx)),
        "Upsample" => one(upsample(cx)),
        "LSTM" | "GRU" | "RNN" => Some(rnn(cx)),
        "GridSample" => one(grid_sample(cx)),
        "NonMaxSuppression" => one(Some(vec![Dim::Unknown, Dim::Fixed(3)])),
        "RandomNormal" | "RandomUniform" => one(cx
            .attr_ints("shape")
            .map(|s| s.iter().map(|&d| Dim::Fixed(d.max(0) as usize)).collect())),
        "Multinomial" => one(cx.shape(0).filter(|s| s.len() == 2).map(|s| {
            vec![
                s[0].clone(),
                Dim::Fixed(cx.attr_i("sample_size", 1).max(0) as usize),
            ]
        })),
        "HannWindow" | "HammingWindow" | "BlackmanWindow" => one(Some(vec![cx
            .const_ints(0)
            .and_then(|v| v.first().copied())
            .map_or(Dim::Unknown, |n| Dim::Fixed(n.max(0) as usize))])),
        "SoftmaxCrossEntropyLoss" | "NegativeLogLikelihoodLoss" => Some(loss(cx)),
        "Attention" => Some(attention(cx)),
        "DFT" => one(dft(cx)),
        "STFT" => one(stft(cx)),
        "AffineGrid" => one(affine_grid(cx)),
        "Col2Im" => one(col2im(cx)),
        "ImageDecoder" => {
            let c = if cx.attr_s("pixel_format", "RGB") == "Grayscale" {
                1
            } else {
                3
            };
            one(Some(vec![Dim::Unknown, Dim::Unknown, Dim::Fixed(c)]))
        }
        _ => None,
    }
}

fn matmul(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let (ab, m) = if a.len() == 1 {
        (&a[..0], None)
    } else {
        (&a[..a.len() - 2], Some(&a[a.len() - 2]))
    };
    let (bb, n) = if b.len() == 1 {
        (&b[..0], None)
    } else {
        (&b[..b.len() - 2], Some(&b[b.len() - 1]))
    };
    let mut out = broadcast(&[ab, bb]);
    out.extend(m.cloned());
    out.extend(n.cloned());
    Some(out)
}

fn gemm(cx: &Cx) -> Option<Vec<Dim>> {
    let (a, b) = (cx.shape(0)?, cx.shape(1)?);
    if a.len() != 2 || b.len() != 2 {
        return None;
    }
    let m = if cx.attr_i("transA", 0) != 0 {
        &a[1]
    } else {
        &a[0]
    };
    let n = if cx.attr_i("transB", 0) != 0 {
        &b[0]
    } else {
        &b[1]
    };
    Some(vec![m.clone(), n.clone()])
}

/// Spatial attributes of a conv or pool over `nsp` spatial dims.
struct Window {
    kernel: Vec<i64>,
    strides: Vec<i64>,
    dilations: Vec<i64>,
    pads: Option<Vec<i64>>,
    auto_pad: String,
    ceil: bool,
}

fn window(cx: &Cx, nsp: usize, kernel: Vec<i64>) -> Option<Window> {
    let ints = |n: &str| {
        cx.attr_ints(n)
            .map(|v| v.to_vec())
            .filter(|v| !v.is_empty())
    };
    let strides = ints("strides").unwrap_or(vec![1; nsp]);
    let dilations = ints("dilations").unwrap_or(vec![1; nsp]);
    if kernel.len() != nsp || strides.len() != nsp || dilations.len() != nsp {
        return None;
    }
    let pads = ints("pads");
    if pads.as_ref().is_some_and(|p| p.len() != 2 * nsp) {
        return None;
    }
    let auto_pad = cx.attr_s("auto_pad", "NOTSET").to_string();
    Some(Window {
        kernel,
        strides,
        dilations,
        pads,
        auto_pad,
        ceil: cx.attr_i("ceil_mode", 0) != 0,
    })
}

impl Window {
    /// Output size of spatial dim `i` (the ONNX shape-inference formula, pytorch's ceil rule).
    fn out(&self, i: usize, d: &Dim) -> Dim {
        let nsp = self.kernel.len();
        let (s, ek) = (
            self.strides[i].max(1),
            (self.kernel[i] - 1) * self.dilations[i] + 1,
        );
        let Some(n) = fixed(d) else {
            // A stride-1 window padded by exactly its extent keeps a symbolic size.
            let same = match (&self.pads, self.auto_pad.as_str()) {
                (Some(p), _) => p[i] + p[i + nsp] == ek - 1,
                (None, "SAME_UPPER" | "SAME_LOWER") => true,
                (None, _) => ek == 1,
            };
            return if s == 1 && same && matches!(d, Dim::Sym(_)) {
                d.clone()
            } else {
                Dim::Unknown
            };
        };
        let n = n as i64;
        // Explicit pads win over auto_pad, as in ONNX's own shape inference.
        let (pb, pe) = match (&self.pads, self.auto_pad.as_str()) {
            (Some(p), _) => (p[i], p[i + nsp]),
            (None, "SAME_UPPER" | "SAME_LOWER") => {
                let r = n % s;
                let total = if r == 0 { ek - s } else { ek - r }.max(0);
                (total / 2, total - total / 2)
            }
            (None, _) => (0, 0),
        };
        let mut out = (n + pb + pe - ek + if self.ceil { s - 1 } else { 0 }).div_euclid(s) + 1;
        if self.ceil && (out - 1) * s >= n + pb {
            out -= 1;
        }
        if out < 0 {
            Dim::Unknown
        } else {
            Dim::Fixed(out as usize)
        }
    }
}

fn conv(cx: &Cx, xi: usize, wi: usize) -> Option<Vec<Dim>> {
    let x = cx.shape(xi)?;
    if x.len() < 3 {
        return None;
    }
    let nsp = x.len() - 2;
    let w = cx.shape(wi);
    let kernel = match cx.attr_ints("kernel_shape") {
        Some(k) => k.to_vec(),
        None => {
            let k = w.and_then(|w| {
                w.get(2..)?
                    .iter()
                    .map(|d| fixed(d).map(|v| v as i64))
                    .collect()
            });
            k.unwrap_or_default()
        }
    };
    let mut out = vec![
        x[0].clone(),
        w.and_then(|w| w.first().cloned()).unwrap_or(Dim::Unknown),
    ];
    let Some(win) = window(cx, nsp, kernel) else {
        out.extend(vec![Dim::Unknown; nsp]);
        return Some(out);
    };
    out.extend((0..nsp).map(|i| win.out(i, &x[2 + i])));
    Some(out)
}

fn pool(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    if x.len() < 3 {
        return None;
    }
    let nsp = x.len() - 2;
    let win = window(cx, nsp, cx.attr_ints("kernel_shape")?.to_vec())?;
    let mut out = vec![x[0].clone(), x[1].clone()];
    out.extend((0..nsp).map(|i| win.out(i, &x[2 + i])));
    Some(out)
}

fn conv_transpose(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    if x.len() < 3 {
        return None;
    }
    let nsp = x.len() - 2;
    let w = cx.shape(1);
    let group = cx.attr_i("group", 1);
    let m = w
        .and_then(|w| w.get(1))
        .map_or(Dim::Unknown, |d| map_fixed(d, |c| c * group));
    let mut out = vec![x[0].clone(), m];
    if let Some(os) = cx.attr_ints("output_shape") {
        let os = if os.len() == nsp + 2 { &os[2..] } else { os };
        out.extend(os.iter().map(|&d| Dim::Fixed(d.max(0) as usize)));
        return Some(out);
    }
    let kernel: Option<Vec<i64>> = match cx.attr_ints("kernel_shape") {
        Some(k) => Some(k.to_vec()),
        None => w.and_then(|w| {
            w.get(2..)?
                .iter()
                .map(|d| fixed(d).map(|v| v as i64))
                .collect()
        }),
    };
    let Some(kernel) = kernel else {
        out.extend(vec![Dim::Unknown; nsp]);
        return Some(out);
    };
    let win = window(cx, nsp, kernel)?;
    let opad = cx
        .attr_ints("output_padding")
        .map(|v| v.to_vec())
        .unwrap_or(vec![0; nsp]);
    for i in 0..nsp {
        let s = win.strides[i];
        let ek = (win.kernel[i] - 1) * win.dilations[i] + 1;
        let same = matches!(win.auto_pad.as_str(), "SAME_UPPER" | "SAME_LOWER");
        let (pb, pe) = match &win.pads {
            Some(p) if !same && win.auto_pad != "VALID" => (p[i], p[i + nsp]),
            _ => (0, 0),
        };
        let op = opad.get(i).copied().unwrap_or(0);
        out.push(map_fixed(&x[2 + i], |n| {
            if same {
                n * s
            } else {
                s * (n - 1) + op + ek - pb - pe
            }
        }));
    }
    Some(out)
}

fn global_pool(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    if x.len() < 2 {
        return None;
    }
    Some(
        x[..2]
            .iter()
            .cloned()
            .chain(std::iter::repeat_n(Dim::Fixed(1), x.len() - 2))
            .collect(),
    )
}

fn max_roi_pool(cx: &Cx) -> Option<Vec<Dim>> {
    let (x, rois) = (cx.shape(0)?, cx.shape(1)?);
    let pooled = cx.attr_ints("pooled_shape")?;
    let mut out = vec![rois.first()?.clone(), x.get(1)?.clone()];
    out.extend(pooled.iter().map(|&d| Dim::Fixed(d.max(0) as usize)));
    Some(out)
}

fn roi_align(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    let n = cx
        .shape(1)
        .and_then(|r| r.first().cloned())
        .or_else(|| cx.shape(2).and_then(|b| b.first().cloned()));
    let h = cx.attr_i("output_height", 1).max(0) as usize;
    let w = cx.attr_i("output_width", 1).max(0) as usize;
    Some(vec![
        n.unwrap_or(Dim::Unknown),
        x.get(1)?.clone(),
        Dim::Fixed(h),
        Dim::Fixed(w),
    ])
}

fn max_unpool(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    if cx.has(2) {
        return match cx.const_ints(2) {
            Some(v) => Some(v.iter().map(|&d| Dim::Fixed(d.max(0) as usize)).collect()),
            None => Some(vec![Dim::Unknown; x.len()]),
        };
    }
    if x.len() < 3 {
        return None;
    }
    let nsp = x.len() - 2;
    let win = window(cx, nsp, cx.attr_ints("kernel_shape")?.to_vec())?;
    let pads = win.pads.clone().unwrap_or(vec![0; 2 * nsp]);
    let mut out = vec![x[0].clone(), x[1].clone()];
    for i in 0..nsp {
        out.push(map_fixed(&x[2 + i], |n| {
            (n - 1) * win.strides[i] + win.kernel[i] - pads[i] - pads[i + nsp]
        }));
    }
    Some(out)
}

fn layer_norm(cx: &Cx) -> Shapes {
    let Some(x) = cx.shape(0) else {
        return vec![None; 3];
    };
    let Some(axis) = norm_axis(cx.attr_i("axis", -1), x.len()) else {
        return vec![None; 3];
    };
    let stat: Vec<Dim> = x
        .iter()
        .enumerate()
        .map(|(i, d)| if i < axis { d.clone() } else { Dim::Fixed(1) })
        .collect();
    vec![Some(x.to_vec()), Some(stat.clone()), Some(stat)]
}

fn batch_norm(cx: &Cx) -> Shapes {
    let x = cx.shape(0).map(|s| s.to_vec());
    let c = x
        .as_ref()
        .and_then(|s| s.get(1).cloned())
        .or_else(|| cx.shape(1).and_then(|s| s.first().cloned()));
    let stat = Some(vec![c.unwrap_or(Dim::Unknown)]);
    let mut out = vec![x];
    out.extend(std::iter::repeat_n(stat, cx.n_out().saturating_sub(1)));
    out
}

/// Round half up, as Resize's keep_aspect_ratio_policy says.
fn round_half_up(v: f64) -> i64 {
    (v + 0.5).floor() as i64
}

fn resize(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    let r = x.len();
    let (scales_i, sizes_i) = if cx.opset < 11 {
        (1, usize::MAX)
    } else {
        (2, 3)
    };
    let axes: Vec<usize> = match cx.attr_ints("axes").filter(|_| cx.opset >= 18) {
        Some(a) => a.iter().map(|&v| norm_axis(v, r)).collect::<Option<_>>()?,
        None => (0..r).collect(),
    };
    let present = |i: usize| cx.has(i) && !cx.shape(i).is_some_and(|s| s == [Dim::Fixed(0)]);
    let mut out = x.to_vec();
    if sizes_i != usize::MAX && present(sizes_i) {
        let Some(sizes) = cx.const_ints(sizes_i) else {
            return Some(vec![Dim::Unknown; r]);
        };
        if sizes.len() != axes.len() {
            return None;
        }
        let policy = cx.attr_s("keep_aspect_ratio_policy", "stretch");
        if policy == "stretch" || cx.opset < 18 {
            for (k, &a) in axes.iter().enumerate() {
                out[a] = Dim::Fixed(sizes[k].max(0) as usize);
            }
            return Some(out);
        }
        let ins: Option<Vec<usize>> = axes.iter().map(|&a| fixed(&x[a])).collect();
        let Some(ins) = ins else {
            for &a in &axes {
                out[a] = Dim::Unknown;
            }
            return Some(out);
        };
        let ratios = sizes.iter().zip(&ins).map(|(&s, &n)| s as f64 / n as f64);
        let scale = if policy == "not_larger" {
            ratios.fold(f64::INFINITY, f64::min)
        } else {
            ratios.fold(f64::NEG_INFINITY, f64::max)
        };
        for (k, &a) in axes.iter().enumerate() {
            out[a] = Dim::Fixed(round_half_up(scale * ins[k] as f64).max(0) as usize);
        }
        return Some(out);
    }
    if !present(scales_i) {
        return Some(vec![Dim::Unknown; r]);
    }
    let Some(scales) = cx.const_floats(scales_i) else {
        return Some(vec![Dim::Unknown; r]);
    };
    if scales.len() != axes.len() {
        return None;
    }
    for (k, &a) in axes.iter().enumerate() {
        out[a] = scaled(&x[a], scales[k]);
    }
    Some(out)
}

fn scaled(d: &Dim, scale: f64) -> Dim {
    if scale == 1.0 {
        return d.clone();
    }
    match fixed(d) {
        Some(n) => Dim::Fixed((n as f64 * scale).floor().max(0.0) as usize),
        None => Dim::Unknown,
    }
}

fn upsample(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    let scales: Option<Vec<f64>> = if cx.opset >= 9 {
        cx.const_floats(1)
    } else {
        cx.attr_floats("scales")
            .map(|v| v.iter().map(|&f| f as f64).collect())
    };
    match scales {
        Some(s) if s.len() == x.len() => {
            Some(x.iter().zip(&s).map(|(d, &f)| scaled(d, f)).collect())
        }
        _ => Some(vec![Dim::Unknown; x.len()]),
    }
}

fn rnn(cx: &Cx) -> Shapes {
    let n = cx.n_out();
    let Some(x) = cx.shape(0).filter(|s| s.len() == 3) else {
        return vec![None; n];
    };
    let layout = if cx.opset >= 14 {
        cx.attr_i("layout", 0)
    } else {
        0
    };
    let (seq, batch) = if layout == 0 {
        (&x[0], &x[1])
    } else {
        (&x[1], &x[0])
    };
    let nd = Dim::Fixed(if cx.attr_s("direction", "forward") == "bidirectional" {
        2
    } else {
        1
    });
    let hidden = match cx.attr_i_opt("hidden_size") {
        Some(h) => Dim::Fixed(h.max(0) as usize),
        None => cx
            .shape(2)
            .and_then(|r| r.get(2).cloned())
            .unwrap_or(Dim::Unknown),
    };
    let y = if layout == 0 {
        vec![seq.clone(), nd.clone(), batch.clone(), hidden.clone()]
    } else {
        vec![batch.clone(), seq.clone(), nd.clone(), hidden.clone()]
    };
    let state = if layout == 0 {
        vec![nd, batch.clone(), hidden]
    } else {
        vec![batch.clone(), nd, hidden]
    };
    let mut out = vec![Some(y)];
    out.extend(std::iter::repeat_n(Some(state), n.saturating_sub(1)));
    out
}

fn grid_sample(cx: &Cx) -> Option<Vec<Dim>> {
    let (x, g) = (cx.shape(0)?, cx.shape(1)?);
    if x.len() < 3 || g.len() != x.len() {
        return None;
    }
    let mut out = vec![same_dim(&x[0], &g[0]), x[1].clone()];
    out.extend(g[1..g.len() - 1].iter().cloned());
    Some(out)
}

fn loss(cx: &Cx) -> Shapes {
    let x = cx.shape(0).map(|s| s.to_vec());
    let out0 = if cx.attr_s("reduction", "mean") == "none" {
        cx.shape(1).map(|s| s.to_vec())
    } else {
        Some(vec![])
    };
    vec![out0, x]
}

/// A fixed dim times / divided by a head count (Unknown unless exact).
fn heads_mul(d: &Dim, h: i64) -> Dim {
    if h > 0 {
        map_fixed(d, |v| v * h)
    } else {
        Dim::Unknown
    }
}

fn heads_div(d: &Dim, h: i64) -> Dim {
    if h > 0 {
        map_fixed(d, |v| if v % h == 0 { v / h } else { -1 })
    } else {
        Dim::Unknown
    }
}

/// Q/K/V as [batch, heads, seq, head_size], whether given 4-D or 3-D ([batch, seq, heads*size]).
fn heads_view(s: &[Dim], heads: i64) -> Option<[Dim; 4]> {
    match s.len() {
        4 => Some([s[0].clone(), s[1].clone(), s[2].clone(), s[3].clone()]),
        3 => Some([
            s[0].clone(),
            if heads > 0 {
                Dim::Fixed(heads as usize)
            } else {
                Dim::Unknown
            },
            s[1].clone(),
            heads_div(&s[2], heads),
        ]),
        _ => None,
    }
}

/// Attention (opset 23+): Y, present key/value (past concatenated with the new keys/values) and
/// the optional QK product.
fn attention(cx: &Cx) -> Shapes {
    let mut out = vec![None; cx.n_out()];
    let (Some(q), Some(k), Some(v)) = (cx.shape(0), cx.shape(1), cx.shape(2)) else {
        return out;
    };
    let qh = cx.attr_i("q_num_heads", 0);
    let kvh = cx.attr_i("kv_num_heads", 0);
    let (Some(q4), Some(k4), Some(v4)) =
        (heads_view(q, qh), heads_view(k, kvh), heads_view(v, kvh))
    else {
        return out;
    };
    let past_len = |i: usize| cx.shape(i).filter(|s| s.len() == 4).map(|s| s[2].clone());
    let total = match past_len(4) {
        Some(p) => sum_dims(&[&p, &k4[2]]),
        None if cx.has(4) => Dim::Unknown,
        None => k4[2].clone(),
    };
    let y = if q.len() == 4 {
        vec![q4[0].clone(), q4[1].clone(), q4[2].clone(), v4[3].clone()]
    } else {
        vec![q[0].clone(), q[1].clone(), heads_mul(&v4[3], qh)]
    };
    let shapes = [
        Some(y),
        Some(vec![
            k4[0].clone(),
            k4[1].clone(),
            total.clone(),
            k4[3].clone(),
        ]),
        Some(vec![
            v4[0].clone(),
            v4[1].clone(),
            total.clone(),
            v4[3].clone(),
        ]),
        Some(vec![q4[0].clone(), q4[1].clone(), q4[2].clone(), total]),
    ];
    for (o, s) in out.iter_mut().zip(shapes) {
        *o = s;
    }
    out
}

fn dft(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    let r = x.len();
    if r < 2 {
        return None;
    }
    let axis = if cx.opset >= 20 {
        if cx.has(2) {
            match cx.const_ints(2).and_then(|v| v.first().copied()) {
                Some(a) => a,
                None => return Some(vec![Dim::Unknown; r]),
            }
        } else {
            -2
        }
    } else {
        cx.attr_i("axis", 1)
    };
    let a = norm_axis(axis, r).filter(|&a| a < r - 1)?;
    let (onesided, inverse) = (cx.attr_i("onesided", 0) != 0, cx.attr_i("inverse", 0) != 0);
    let n = if cx.has(1) {
        cx.const_ints(1)
            .and_then(|v| v.first().copied())
            .map_or(Dim::Unknown, |n| Dim::Fixed(n.max(0) as usize))
    } else if onesided && inverse {
        Dim::Unknown
    } else {
        x[a].clone()
    };
    let mut out = x.to_vec();
    out[a] = if onesided && !inverse {
        map_fixed(&n, |v| v / 2 + 1)
    } else {
        n
    };
    out[r - 1] = Dim::Fixed(if onesided && inverse { 1 } else { 2 });
    Some(out)
}

fn stft(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    if x.len() != 3 {
        return None;
    }
    let scalar = |i: usize| cx.const_ints(i).and_then(|v| v.first().copied());
    let fl = scalar(3).or_else(|| {
        cx.shape(2)
            .and_then(|w| w.first())
            .and_then(fixed)
            .map(|v| v as i64)
    });
    let (frames, bins) = match (fl, scalar(1), fixed(&x[1])) {
        (Some(fl), Some(step), Some(len)) if step > 0 && fl > 0 && len as i64 >= fl => (
            Dim::Fixed(((len as i64 - fl) / step + 1) as usize),
            Some(fl),
        ),
        (fl, _, _) => (Dim::Unknown, fl),
    };
    let onesided = cx.attr_i("onesided", 1) != 0;
    let bins = bins.map_or(Dim::Unknown, |fl| {
        Dim::Fixed(if onesided { fl / 2 + 1 } else { fl } as usize)
    });
    Some(vec![x[0].clone(), frames, bins, Dim::Fixed(2)])
}

fn affine_grid(cx: &Cx) -> Option<Vec<Dim>> {
    let size: Vec<Dim> = match cx.sym_ints(1) {
        Some(v) => v.iter().map(|x| x.to_dim()).collect(),
        None => match cx.shape(1) {
            Some([Dim::Fixed(n)]) => vec![Dim::Unknown; *n],
            _ => return None,
        },
    };
    match size.len() {
        4 => Some(vec![
            size[0].clone(),
            size[2].clone(),
            size[3].clone(),
            Dim::Fixed(2),
        ]),
        5 => Some(vec![
            size[0].clone(),
            size[2].clone(),
            size[3].clone(),
            size[4].clone(),
            Dim::Fixed(3),
        ]),
        _ => None,
    }
}

fn col2im(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    if x.len() != 3 {
        return None;
    }
    let image: Vec<Dim> = match cx.const_ints(1) {
        Some(v) => v.iter().map(|&d| Dim::Fixed(d.max(0) as usize)).collect(),
        None => match cx.shape(1) {
            Some([Dim::Fixed(n)]) => vec![Dim::Unknown; *n],
            _ => return None,
        },
    };
    let c = match cx.const_ints(2) {
        Some(b) => {
            let p: i64 = b.iter().product();
            heads_div(&x[1], p)
        }
        None => Dim::Unknown,
    };
    let mut out = vec![x[0].clone(), c];
    out.extend(image);
    Some(out)
}
