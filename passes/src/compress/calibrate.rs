//! Calibration: loading sample inputs, observing the float model's values on kiln's own runtime,
//! and choosing activation ranges from what was observed (minmax, percentile, entropy, mse).
//!
//! Observation lowers a copy of the IR whose graph outputs also include the watched values, so
//! the values seen are exactly what the CPU backend computes (fused ops included). Statistics are
//! streamed sample by sample; nothing but a histogram per watched value is kept.
//!
//! Samples are read with a minimal .npy reader of its own (C-order, little-endian numeric arrays)
//! and the compiler's .pb decoder: the CLI's full .npy module lives in the binary crate, out of
//! reach of this library.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use kiln_backends::CpuBackend;
use kiln_compiler::ir::{Model, ValueId};
use kiln_runtime::{Artifact, DType, Error, Result, Tensor};

use super::Calibrator;

/// Calibration inputs: `samples[i][k]` is graph input `k` (named `names[k]`) of sample `i`.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub names: Vec<String>,
    pub samples: Vec<Vec<Tensor>>,
}

impl Samples {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The first `n` samples (all if fewer).
    pub fn first(&self, n: usize) -> Samples {
        Samples { names: self.names.clone(), samples: self.samples.iter().take(n).cloned().collect() }
    }
}

/// Load `dir`: one sub-folder per sample holding `input_K.npy` (or `.pb`) for graph input K,
/// or `dir` itself when it holds `input_0.*` (a single sample). Sub-folders are taken in name
/// order (numbers compared as numbers).
pub fn load_samples(dir: &Path, model: &Model) -> Result<Samples> {
    let g = &model.graph;
    let names: Vec<String> = g.inputs.iter().map(|&v| g.values[v].name.clone()).collect();
    let folders = sample_folders(dir)?;
    let bar = progress(folders.len(), "loading calibration samples");
    let mut samples = Vec::with_capacity(folders.len());
    for f in &folders {
        let mut inputs = Vec::with_capacity(names.len());
        for (k, &v) in g.inputs.iter().enumerate() {
            let t = read_input_file(f, k)?;
            if let Some(want) = g.values[v].ty.dtype() {
                if t.dtype() != want {
                    return Err(Error::Input(format!(
                        "{}: input_{k} is {}, the model's input '{}' is {want}",
                        f.display(),
                        t.dtype(),
                        names[k]
                    )));
                }
            }
            inputs.push(t);
        }
        samples.push(inputs);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Samples { names, samples })
}

/// The sample folders of `dir`, sorted.
pub fn sample_folders(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::Input(format!("{}: not a folder", dir.display())));
    }
    if input_file(dir, 0).is_some() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::Input(format!("cannot read {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && input_file(p, 0).is_some())
        .collect();
    folders.sort_by_cached_key(|p| natural_key(&p.file_name().unwrap_or_default().to_string_lossy()));
    if folders.is_empty() {
        return Err(Error::Input(format!(
            "{}: no samples (expected sub-folders holding input_0.npy, input_1.npy, …)",
            dir.display()
        )));
    }
    Ok(folders)
}

/// Sort key comparing digit runs as numbers ("s2" < "s10").
fn natural_key(s: &str) -> Vec<(u8, u64, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        let digit = c.is_ascii_digit();
        let mut run = String::new();
        while let Some(&c) = chars.peek().filter(|c| c.is_ascii_digit() == digit) {
            run.push(c);
            chars.next();
        }
        out.push(if digit { (0, run.parse().unwrap_or(u64::MAX), run) } else { (1, 0, run) });
    }
    out
}

fn input_file(dir: &Path, k: usize) -> Option<PathBuf> {
    ["npy", "pb"].iter().map(|e| dir.join(format!("input_{k}.{e}"))).find(|p| p.is_file())
}

fn read_input_file(dir: &Path, k: usize) -> Result<Tensor> {
    let p = input_file(dir, k)
        .ok_or_else(|| Error::Input(format!("{}: no input_{k}.npy (or .pb)", dir.display())))?;
    if p.extension().is_some_and(|e| e == "pb") {
        return kiln_compiler::onnx::decode_tensor_file(&p);
    }
    let data = std::fs::read(&p).map_err(|e| Error::Input(format!("cannot read {}: {e}", p.display())))?;
    parse_npy(&data).map_err(|m| Error::Input(format!("{}: {m}", p.display())))
}

/// A C-order, little-endian numeric .npy array.
pub fn parse_npy(data: &[u8]) -> std::result::Result<Tensor, String> {
    if data.len() < 10 || &data[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (hlen, start) = match data[6] {
        1 => (u16::from_le_bytes([data[8], data[9]]) as usize, 10),
        2 | 3 if data.len() >= 12 => (u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let body = start + hlen;
    let header = data.get(start..body).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        let end = if rest.starts_with('(') { rest.find(')')? + 1 } else { rest.find([',', '}'])? };
        Some(rest[..end].trim())
    };
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err("Fortran-order arrays are not supported for calibration (save with C order)".into());
    }
    let descr = field("descr").ok_or("no descr")?.trim_matches(['\'', '"']);
    let dtype = match descr.trim_start_matches(['<', '|', '=']) {
        "f4" => DType::F32,
        "f8" => DType::F64,
        "f2" => DType::F16,
        "i1" => DType::I8,
        "u1" => DType::U8,
        "i2" => DType::I16,
        "u2" => DType::U16,
        "i4" => DType::I32,
        "u4" => DType::U32,
        "i8" => DType::I64,
        "u8" => DType::U64,
        "b1" => DType::Bool,
        _ => return Err(format!("unsupported dtype {descr}")),
    };
    let shape_txt = field("shape").ok_or("no shape")?;
    let shape = shape_txt
        .trim_matches(['(', ')'])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape_txt}")))
        .collect::<std::result::Result<Vec<usize>, String>>()?;
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    let nbytes = n.checked_mul(dtype.size()).ok_or("shape overflows")?;
    let payload = data[body..].get(..nbytes).ok_or("truncated data")?;
    Tensor::from_bytes(dtype, &shape, payload).map_err(|e| e.to_string())
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(n: usize, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    if let Ok(style) = ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]") {
        bar.set_style(style);
    }
    bar.set_message(msg.to_string());
    bar
}

/// Lower `model` as it is (no passes) with `extra` values appended to its graph outputs, and
/// prepare it on the CPU backend with `threads` threads (0 = one per core).
pub fn prepare(model: &Model, extra: &[ValueId], threads: usize) -> Result<kiln_runtime::Model> {
    let mut m = model.clone();
    m.graph.outputs.extend_from_slice(extra);
    let lowered = kiln_compiler::lower::lower(&m, "cpu-generic", &[])?;
    let artifact = Artifact::from_vec(kiln_compiler::writer::to_bytes(&lowered)?)?;
    kiln_runtime::Model::new(artifact, &CpuBackend::new(threads)?)
}

/// The IR model prepared on the CPU backend, with extra values after its own outputs.
struct Runner {
    session: kiln_runtime::Session,
    n_outputs: usize,
}

impl Runner {
    fn new(model: &Model, extra: &[ValueId]) -> Result<Runner> {
        let rt = prepare(model, extra, 0)?;
        Ok(Runner { session: rt.session(), n_outputs: model.graph.outputs.len() })
    }

    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.session.run(inputs.to_vec())
    }
}

/// Run the float `model` on every sample with kiln's own CPU runtime (lowering a copy whose
/// outputs include `watch`); call `f(sample_index, value, &tensor)` for every watched value.
/// Watched constants and graph inputs are reported without running anything for them.
pub fn observe(
    model: &Model,
    s: &Samples,
    watch: &[ValueId],
    f: &mut dyn FnMut(usize, ValueId, &Tensor),
) -> Result<()> {
    let g = &model.graph;
    if let Some(&bad) = watch.iter().find(|&&v| v >= g.values.len()) {
        return Err(Error::Other(format!("observe: value {bad} is not in the graph")));
    }
    // Computed values become extra outputs (unless they are outputs already); inputs and
    // constants are read directly.
    let mut extra: Vec<ValueId> = Vec::new();
    for &v in watch {
        let direct = g.konst(v).is_some() || g.inputs.contains(&v) || g.outputs.contains(&v);
        if !direct && !extra.contains(&v) {
            extra.push(v);
        }
    }
    let mut runner = Runner::new(model, &extra)?;
    let bar = progress(s.len(), "calibrating");
    for (i, sample) in s.samples.iter().enumerate() {
        let outs = runner.run(sample)?;
        for &v in watch {
            if let Some(t) = g.konst(v) {
                f(i, v, t);
            } else if let Some(k) = g.inputs.iter().position(|&x| x == v) {
                f(i, v, &sample[k]);
            } else if let Some(k) = g.outputs.iter().position(|&x| x == v) {
                f(i, v, &outs[k]);
            } else {
                let j = extra.iter().position(|&x| x == v).expect("every computed watch is an extra output");
                f(i, v, &outs[runner.n_outputs + j]);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// The model's outputs on every sample (for measuring output error of a quantized model).
pub fn run_outputs(model: &Model, s: &Samples) -> Result<Vec<Vec<Tensor>>> {
    let mut runner = Runner::new(model, &[])?;
    let bar = progress(s.len(), "running");
    let mut out = Vec::with_capacity(s.len());
    for sample in &s.samples {
        out.push(runner.run(sample)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Where a value's channels are: axis 1 (NCHW, a convolution's input) or the last axis (a
/// MatMul's K).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelAxis {
    Second,
    Last,
}

/// (outer, channels, inner) of a tensor shape split at `axis`; None for a scalar.
fn split_at_axis(shape: &[usize], axis: ChannelAxis) -> Option<(usize, usize, usize)> {
    let a = match axis {
        ChannelAxis::Second if shape.len() >= 2 => 1,
        ChannelAxis::Last if !shape.is_empty() => shape.len() - 1,
        _ => return None,
    };
    Some((shape[..a].iter().product(), shape[a], shape[a + 1..].iter().product()))
}

/// Per-channel statistics of one value over all samples.
#[derive(Clone, Debug, Default)]
pub struct ChannelStats {
    /// Largest |x| per channel.
    pub absmax: Vec<f32>,
    /// Mean of x² per channel.
    pub mean_sq: Vec<f64>,
    /// Smallest x over all channels.
    pub min: f32,
}

/// `ChannelStats` of each watched f32 value.
pub fn channel_stats(model: &Model, s: &Samples, watch: &[(ValueId, ChannelAxis)]) -> Result<HashMap<ValueId, ChannelStats>> {
    let axes: HashMap<ValueId, ChannelAxis> = watch.iter().copied().collect();
    let ids: Vec<ValueId> = watch.iter().map(|w| w.0).collect();
    // (stats with mean_sq holding sums, count per channel)
    let mut acc: HashMap<ValueId, (ChannelStats, u64)> = HashMap::new();
    let mut bad: Option<String> = None;
    observe(model, s, &ids, &mut |_, v, t| {
        let (Ok(x), Some((outer, c, inner))) = (t.view::<f32>(), split_at_axis(t.shape(), axes[&v])) else {
            bad.get_or_insert_with(|| format!("value '{}' is not an f32 tensor with channels", model.graph.values[v].name));
            return;
        };
        let (st, n) = acc.entry(v).or_insert_with(|| {
            (ChannelStats { absmax: vec![0.0; c], mean_sq: vec![0.0; c], min: f32::INFINITY }, 0)
        });
        if st.absmax.len() != c {
            bad.get_or_insert_with(|| format!("value '{}' changes its channel count", model.graph.values[v].name));
            return;
        }
        for o in 0..outer {
            for ch in 0..c {
                let run = &x[(o * c + ch) * inner..(o * c + ch + 1) * inner];
                let (mut m, mut sq, mut lo) = (st.absmax[ch], 0f64, st.min);
                for &xv in run.iter().filter(|v| v.is_finite()) {
                    m = m.max(xv.abs());
                    lo = lo.min(xv);
                    sq += (xv as f64) * (xv as f64);
                }
                st.absmax[ch] = m;
                st.mean_sq[ch] += sq;
                st.min = lo;
            }
        }
        *n += (outer * inner) as u64;
    })?;
    if let Some(msg) = bad {
        return Err(Error::Other(format!("calibration: {msg}")));
    }
    Ok(acc
        .into_iter()
        .map(|(v, (mut st, n))| {
            st.mean_sq.iter_mut().for_each(|q| *q /= n.max(1) as f64);
            (v, st)
        })
        .collect())
}

/// Activation range (lo, hi) of each watched f32 value under `cal`. Ranges always include 0
/// (so that zero is exactly representable), and are never empty.
pub fn ranges(
    model: &Model,
    s: &Samples,
    watch: &[ValueId],
    cal: Calibrator,
) -> Result<HashMap<ValueId, (f32, f32)>> {
    ranges_scaled(model, s, watch, cal, &HashMap::new())
}

/// `ranges` of the values as the int8 kernels will see them: a value in `mul` has each channel
/// multiplied by its factor first (the smoothing of `quant_int8`).
pub fn ranges_scaled(
    model: &Model,
    s: &Samples,
    watch: &[ValueId],
    cal: Calibrator,
    mul: &HashMap<ValueId, (ChannelAxis, Vec<f32>)>,
) -> Result<HashMap<ValueId, (f32, f32)>> {
    let mut hists: HashMap<ValueId, Histogram> = HashMap::new();
    let mut bad: Option<String> = None;
    let mut scaled = Vec::new();
    observe(model, s, watch, &mut |_, v, t| {
        if bad.is_some() {
            return;
        }
        let x = match t.view::<f32>() {
            Ok(x) => x,
            Err(_) => {
                bad = Some(format!("value '{}' is {}, not f32", model.graph.values[v].name, t.dtype()));
                return;
            }
        };
        let x = match (mul.get(&v), mul.get(&v).and_then(|(axis, _)| split_at_axis(t.shape(), *axis))) {
            (Some((_, m)), Some((_, c, inner))) if m.len() == c => {
                scaled.clear();
                scaled.extend(x.iter().enumerate().map(|(i, &xv)| xv * m[(i / inner) % c]));
                &scaled[..]
            }
            (Some(_), _) => {
                bad = Some(format!("value '{}': smoothing factors do not fit its shape", model.graph.values[v].name));
                return;
            }
            _ => x,
        };
        hists.entry(v).or_insert_with(Histogram::new).add(x);
    })?;
    if let Some(msg) = bad {
        return Err(Error::Other(format!("calibration: {msg}")));
    }
    Ok(hists.into_iter().map(|(v, h)| (v, h.range(cal))).collect())
}

/// Bins of the |x| histogram (as TensorRT's entropy calibration).
pub const BINS: usize = 2048;

/// Running statistics of one value: min, max, and a histogram of |x| over [0, width * BINS).
/// When a larger |x| arrives the range doubles and adjacent bins merge, so a single pass over
/// the samples suffices.
#[derive(Clone, Debug)]
pub struct Histogram {
    pub min: f32,
    pub max: f32,
    /// Width of one bin (0 until a non-zero |x| was seen).
    pub width: f64,
    pub counts: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram { min: f32::INFINITY, max: f32::NEG_INFINITY, width: 0.0, counts: vec![0; BINS] }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Add values (NaN and infinities are ignored: they carry no range information).
    pub fn add(&mut self, xs: &[f32]) {
        let mut amax = 0f32;
        for &x in xs.iter().filter(|x| x.is_finite()) {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
            amax = amax.max(x.abs());
        }
        if amax > 0.0 {
            if self.width == 0.0 {
                self.width = amax as f64 / BINS as f64;
            }
            // |x| == the range's end goes into the last bin
            while amax as f64 > self.width * BINS as f64 {
                self.double();
            }
        }
        let last = BINS - 1;
        for &x in xs.iter().filter(|x| x.is_finite()) {
            let b = if self.width > 0.0 { ((x.abs() as f64 / self.width) as usize).min(last) } else { 0 };
            self.counts[b] += 1;
        }
    }

    fn double(&mut self) {
        for i in 0..BINS / 2 {
            self.counts[i] = self.counts[2 * i] + self.counts[2 * i + 1];
        }
        self.counts[BINS / 2..].fill(0);
        self.width *= 2.0;
    }

    /// Bins actually used (one past the last non-empty one).
    fn used(&self) -> usize {
        self.counts.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1)
    }

    /// The range `cal` picks: a threshold T on |x|, intersected with [min, max] and widened to
    /// include 0.
    pub fn range(&self, cal: Calibrator) -> (f32, f32) {
        if !(self.min <= self.max) {
            return (0.0, 0.0);
        }
        let t = match cal {
            Calibrator::MinMax => f32::INFINITY,
            Calibrator::Percentile(p) => self.percentile(p),
            Calibrator::Entropy => self.entropy_threshold(),
            Calibrator::Mse => self.mse_threshold(),
        };
        (self.min.max(-t).min(0.0), self.max.min(t).max(0.0))
    }

    /// The `p`-th percentile of |x| (linear within the bin it falls in).
    pub fn percentile(&self, p: f32) -> f32 {
        let total = self.total();
        if total == 0 || self.width == 0.0 {
            return 0.0;
        }
        let want = (p as f64 / 100.0).clamp(0.0, 1.0) * total as f64;
        let mut seen = 0f64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 && seen + c as f64 >= want {
                let frac = ((want - seen) / c as f64).clamp(0.0, 1.0);
                return ((i as f64 + frac) * self.width) as f32;
            }
            seen += c as f64;
        }
        (self.used() as f64 * self.width) as f32
    }

    /// Quantization levels available over [0, T]: 128 for a signed value, 256 for one that is
    /// never negative (it gets the whole 8-bit range).
    fn levels(&self) -> usize {
        if self.min >= 0.0 { 256 } else { 128 }
    }

    /// TensorRT's entropy calibration: the threshold (a bin edge) whose clipped and quantized
    /// distribution Q is closest to the observed P in KL divergence.
    pub fn entropy_threshold(&self) -> f32 {
        let used = self.used();
        let levels = self.levels();
        if used <= levels {
            return (used as f64 * self.width) as f32;
        }
        let mut best = (f64::INFINITY, used);
        for i in levels..=used {
            let kl = kl_clipped(&self.counts[..used], i, levels);
            if kl < best.0 {
                best = (kl, i);
            }
        }
        (best.1 as f64 * self.width) as f32
    }

    /// The threshold minimising the expected squared error of quantizing to 8 bits: rounding
    /// noise step²/12 for values inside, (|x| - T)² for clipped ones (bin centres).
    pub fn mse_threshold(&self) -> f32 {
        let used = self.used();
        if used == 0 {
            return 0.0;
        }
        let mut best = (f64::INFINITY, used);
        for i in 1..=used {
            let t = i as f64 * self.width;
            // 255 steps span [0, T] for a non-negative value, [-T, T] for a signed one.
            let step = if self.levels() == 256 { t / 255.0 } else { 2.0 * t / 255.0 };
            let noise = step * step / 12.0;
            let mut err = 0f64;
            for (b, &c) in self.counts[..used].iter().enumerate() {
                if c == 0 {
                    continue;
                }
                let x = (b as f64 + 0.5) * self.width;
                err += c as f64 * if x > t { (x - t) * (x - t) } else { noise };
            }
            if err < best.0 {
                best = (err, i);
            }
        }
        (best.1 as f64 * self.width) as f32
    }
}

/// KL(P || Q) where P is `counts[..i]` with everything beyond folded into its last bin, and Q
/// is P merged into `levels` groups and spread back evenly over each group's non-empty bins.
fn kl_clipped(counts: &[u64], i: usize, levels: usize) -> f64 {
    let mut p: Vec<f64> = counts[..i].iter().map(|&c| c as f64).collect();
    p[i - 1] += counts[i..].iter().map(|&c| c as f64).sum::<f64>();
    let mut q = vec![0f64; i];
    for l in 0..levels {
        let a = l * i / levels;
        let b = ((l + 1) * i / levels).max(a + 1).min(i);
        // Q is merged from the slice without the outliers (as TensorRT), so clipping shows as
        // divergence in the last bin; it is spread over the bins where P has mass.
        let sum: f64 = counts[a..b].iter().map(|&c| c as f64).sum();
        let nonzero = p[a..b].iter().filter(|&&c| c > 0.0).count();
        if nonzero > 0 {
            for j in a..b {
                if p[j] > 0.0 {
                    q[j] = sum / nonzero as f64;
                }
            }
        }
    }
    let (ps, qs): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if ps == 0.0 || qs == 0.0 {
        return f64::INFINITY;
    }
    let mut kl = 0f64;
    for (pj, qj) in p.iter().zip(&q) {
        if *pj > 0.0 {
            let (pj, qj) = (pj / ps, qj / qs);
            // An empty Q bin where P has mass: smoothed rather than infinite.
            kl += pj * (pj / qj.max(1e-12)).ln();
        }
    }
    kl
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_compiler::ir::{Dim, Graph, Node, Type};

    /// Deterministic standard normal samples (xorshift + Box-Muller).
    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut uniform = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }

    fn hist(xs: &[f32]) -> Histogram {
        let mut h = Histogram::new();
        h.add(xs);
        h
    }

    /// Mean squared error of symmetric 8-bit quantization with clipping threshold t.
    fn quant_mse(xs: &[f32], t: f32) -> f64 {
        let step = 2.0 * t as f64 / 255.0;
        let mut e = 0f64;
        for &x in xs {
            let q = ((x as f64).clamp(-t as f64, t as f64) / step).round() * step;
            e += (q - x as f64).powi(2);
        }
        e / xs.len() as f64
    }

    #[test]
    fn minmax_is_the_observed_range_and_includes_zero() {
        assert_eq!(hist(&[-1.0, 0.5, 3.0]).range(Calibrator::MinMax), (-1.0, 3.0));
        assert_eq!(hist(&[2.0, 2.5, 3.0]).range(Calibrator::MinMax), (0.0, 3.0));
        assert_eq!(hist(&[-4.0, -2.0]).range(Calibrator::MinMax), (-4.0, 0.0));
        assert_eq!(Histogram::new().range(Calibrator::Entropy), (0.0, 0.0));
        assert_eq!(hist(&[0.0, 0.0]).range(Calibrator::Mse), (0.0, 0.0));
        // NaN and infinities carry no range
        assert_eq!(hist(&[f32::NAN, 1.0, f32::INFINITY, -0.5]).range(Calibrator::MinMax), (-0.5, 1.0));
    }

    #[test]
    fn histogram_grows_by_merging_bins() {
        let mut h = hist(&[0.5, -0.3]);
        let w0 = h.width;
        h.add(&[4.0, 1.1]);
        assert_eq!(h.width, w0 * 8.0);
        assert_eq!(h.total(), 4);
        assert!(4.0 <= h.width * BINS as f64);
        // each value sits in the bin its |x| falls in (0.5 sat on the old range's end)
        for x in [0.3f64, 1.1, 4.0] {
            assert_eq!(h.counts[((x / h.width) as usize).min(BINS - 1)], 1, "{x}");
        }
        assert_eq!((h.min, h.max), (-0.3, 4.0));
    }

    #[test]
    fn percentile_of_uniform_values() {
        let xs: Vec<f32> = (0..100_000).map(|i| i as f32 / 100_000.0 * if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let h = hist(&xs);
        for p in [50.0f32, 90.0, 99.0, 99.99] {
            let t = h.percentile(p);
            assert!((t - p / 100.0).abs() < 2e-3, "p{p}: {t}");
        }
        assert!((h.percentile(100.0) - 1.0).abs() < 2e-3);
        let (lo, hi) = h.range(Calibrator::Percentile(99.0));
        assert!((lo + 0.99).abs() < 2e-3 && (hi - 0.99).abs() < 2e-3, "{lo} {hi}");
    }

    #[test]
    fn kl_is_zero_when_every_level_is_one_bin() {
        let counts = [5u64, 0, 3, 7, 1, 0, 2, 9];
        assert!(kl_clipped(&counts, 8, 8).abs() < 1e-12);
        // clipping mass into the last bin makes P differ from Q
        assert!(kl_clipped(&counts, 4, 4) > 0.0);
    }

    #[test]
    fn entropy_clips_outliers_of_a_gaussian() {
        let mut xs = normal(200_000, 7);
        xs.extend_from_slice(&[60.0, -55.0, 58.0]);
        let t = hist(&xs).entropy_threshold();
        assert!(t > 2.0 && t < 12.0, "threshold {t}");
        // without outliers a uniform distribution keeps (nearly) its whole range
        let xs: Vec<f32> = (0..50_000).map(|i| (i as f32 / 25_000.0) - 1.0).collect();
        let t = hist(&xs).entropy_threshold();
        assert!(t > 0.9 && t <= 1.01, "threshold {t}");
    }

    #[test]
    fn entropy_range_of_non_negative_values_starts_at_zero() {
        let xs: Vec<f32> = normal(50_000, 3).into_iter().map(|x| x.max(0.0)).collect();
        let (lo, hi) = hist(&xs).range(Calibrator::Entropy);
        assert_eq!(lo, 0.0);
        assert!(hi > 1.5 && hi <= xs.iter().cloned().fold(0.0, f32::max), "{hi}");
    }

    #[test]
    fn mse_threshold_beats_minmax_and_a_tight_clip() {
        // the chosen threshold is (nearly) as good as the best of a fine grid, on the real data
        let mut xs = normal(100_000, 11);
        xs.extend_from_slice(&[40.0, -38.0]);
        let t = hist(&xs).mse_threshold();
        let best = (1..=400).map(|k| quant_mse(&xs, k as f32 * 0.1)).fold(f64::INFINITY, f64::min);
        assert!(quant_mse(&xs, t) <= best * 1.05, "{t}: {} vs {best}", quant_mse(&xs, t));
        let xs = normal(100_000, 5);
        let t = hist(&xs).mse_threshold();
        let amax = xs.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(t < amax && quant_mse(&xs, t) < quant_mse(&xs, amax) && quant_mse(&xs, t) < quant_mse(&xs, t / 3.0));
        // a uniform distribution is best left unclipped
        let xs: Vec<f32> = (0..20_001).map(|i| (i as f32 / 10_000.0) - 1.0).collect();
        let t = hist(&xs).mse_threshold();
        assert!(t > 0.95, "{t}");
    }

        fn npy(descr: &str, shape: &str, payload: &[u8], fortran: bool) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}", if fortran { "True" } else { "False" });
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn reads_npy() {
        let f: Vec<u8> = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = parse_npy(&npy("<f4", "(2, 3)", &f, false)).unwrap();
        assert_eq!((t.dtype(), t.shape()), (DType::F32, &[2usize, 3][..]));
        assert_eq!(t.view::<f32>().unwrap(), &[1.5, -2.0, 3.25, 0.0, 7.0, 8.0]);
        let i: Vec<u8> = [101i64, 2023, 102].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = parse_npy(&npy("<i8", "(1, 3)", &i, false)).unwrap();
        assert_eq!(t.view::<i64>().unwrap(), &[101, 2023, 102]);
        let t = parse_npy(&npy("<f8", "()", &4.5f64.to_le_bytes(), false)).unwrap();
        assert_eq!((t.shape(), t.item::<f64>().unwrap()), (&[] as &[usize], 4.5));
        assert!(parse_npy(&npy("<f4", "(2, 3)", &f, true)).unwrap_err().contains("Fortran"));
        assert!(parse_npy(&npy("<f4", "(2, 4)", &f, false)).is_err());
        assert!(parse_npy(&npy("<c8", "(1,)", &f, false)).is_err());
        assert!(parse_npy(b"\x93NUMPY").is_err());
    }

    #[test]
    fn natural_order_of_sample_folders() {
        let mut v = vec!["s10", "s2", "s1", "a"];
        v.sort_by_cached_key(|s| natural_key(s));
        assert_eq!(v, ["a", "s1", "s2", "s10"]);
    }

    /// x[2,3] -> Mul(x, 2) = m -> Relu = y (the output).
    fn tiny_model() -> (Model, ValueId, ValueId) {
        let mut g = Graph::default();
        let ty = || Type::tensor(DType::F32, vec![Dim::Fixed(2), Dim::Fixed(3)]);
        let x = g.add_value("x", ty());
        let two = g.add_const("two", Tensor::scalar(2.0f32));
        let m = g.add_value("m", ty());
        let y = g.add_value("y", ty());
        let node = |op: &str, inputs: Vec<ValueId>, out: ValueId| Node {
            name: format!("{op}_node"),
            op: op.into(),
            domain: String::new(),
            opset: 17,
            inputs: inputs.into_iter().map(Some).collect(),
            outputs: vec![Some(out)],
            attrs: vec![],
        };
        g.nodes = vec![node("Mul", vec![x, two], m), node("Relu", vec![m], y)];
        g.inputs = vec![x];
        g.outputs = vec![y];
        (Model { graph: g, opsets: vec![(String::new(), 17)], ir_version: 8, ..Default::default() }, x, m)
    }

    fn tiny_samples() -> Samples {
        let a = Tensor::from_vec(&[2, 3], vec![-1.0f32, 0.5, 2.0, -3.0, 1.0, 0.25]).unwrap();
        let b = Tensor::from_vec(&[2, 3], vec![4.0f32, -0.5, 0.0, 1.0, -2.0, 3.0]).unwrap();
        Samples { names: vec!["x".into()], samples: vec![vec![a], vec![b]] }
    }

    #[test]
    fn observe_sees_what_the_runtime_computes() {
        let (model, x, m) = tiny_model();
        let s = tiny_samples();
        let mut seen = Vec::new();
        let y = model.graph.outputs[0];
        observe(&model, &s, &[m, x, y], &mut |i, v, t| seen.push((i, v, t.view::<f32>().unwrap().to_vec()))).unwrap();
        assert_eq!(seen.len(), 6);
        assert_eq!(seen[0], (0, m, vec![-2.0, 1.0, 4.0, -6.0, 2.0, 0.5]));
        assert_eq!(seen[1], (0, x, vec![-1.0, 0.5, 2.0, -3.0, 1.0, 0.25]));
        assert_eq!(seen[2], (0, y, vec![0.0, 1.0, 4.0, 0.0, 2.0, 0.5]));
        assert_eq!(seen[3].0, 1);
        let r = ranges(&model, &s, &[m], Calibrator::MinMax).unwrap();
        assert_eq!(r[&m], (-6.0, 8.0));
        let outs = run_outputs(&model, &s).unwrap();
        assert_eq!(outs.len(), 2);
        assert_eq!(outs[1][0].view::<f32>().unwrap(), &[8.0, 0.0, 0.0, 2.0, 0.0, 6.0]);
        assert!(observe(&model, &s, &[99], &mut |_, _, _| {}).is_err());
    }

    #[test]
    fn loads_sample_folders() {
        let (model, _, _) = tiny_model();
        let dir = std::env::temp_dir().join(format!("kiln-calib-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let f: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        for name in ["10", "2"] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("input_0.npy"), npy("<f4", "(2, 3)", &f, false)).unwrap();
        }
        let s = load_samples(&dir, &model).unwrap();
        assert_eq!((s.names.clone(), s.len()), (vec!["x".to_string()], 2));
        assert_eq!(sample_folders(&dir).unwrap()[0].file_name().unwrap(), "2");
        // one sample given directly
        assert_eq!(load_samples(&dir.join("2"), &model).unwrap().len(), 1);
        // wrong dtype
        std::fs::write(dir.join("2").join("input_0.npy"), npy("<f8", "(2, 3)", &[0u8; 48], false)).unwrap();
        assert!(load_samples(&dir, &model).unwrap_err().to_string().contains("input_0"));
        assert!(load_samples(&dir.join("none"), &model).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
