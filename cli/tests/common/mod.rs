//! Helpers shared by the CLI's integration tests: where the test data lives, running the `kiln`
//! binary with a timeout, reading `.npy` files, and comparing tensors.
//!
//! The tests drive the binary as a user would; they never use the CLI's own modules, so a bug in
//! the binary's npy writer cannot hide behind the same bug in the reader.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_runtime::{DType, Tensor};

// ------------------------------------------------------------------ locations

/// `$KILN_CACHE`, else `~/.cache/kiln` (filled by `python3 testdata/fetch.py`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("kiln")
}

/// The workspace root (the cli crate's parent).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("cli/ has a parent").to_path_buf()
}

/// The `kiln` binary cargo built for these tests.
pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// Cargo's target dir (the binary lives in `target/<profile>/kiln`), for reports.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() { dir } else { workspace_dir().join(dir) };
    }
    let bin = kiln_bin();
    bin.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| workspace_dir().join("target"))
}

/// Panic with the standard "fetch the test data" message if `path` does not exist.
pub fn require_data(path: &Path, what: &str) {
    if !path.exists() {
        panic!(
            "{what} not found at {}.\nFetch the test data first: python3 testdata/fetch.py && python3 \
             testdata/make_goldens.py (from the workspace root; cache dir ${{KILN_CACHE:-~/.cache/kiln}}; \
             .ci/run does this)",
            path.display()
        );
    }
}

/// Write a line straight to the process's stderr, past the test harness's output capture, so
/// summaries show up in CI logs even when the test passes.
pub fn announce(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

// ------------------------------------------------------------------ running kiln

/// How one `kiln` invocation ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// One line saying why the run failed: timeout, the first non-empty stderr line, or the
    /// exit status.
    pub fn reason(&self) -> String {
        if self.timed_out {
            return format!("timeout after {:.0} s", self.elapsed.as_secs_f64());
        }
        let line = self.stderr.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
        let status = match self.status {
            Some(s) => match s.code() {
                Some(c) => format!("exit {c}"),
                None => format!("{s}"),
            },
            None => "could not start".to_string(),
        };
        if line.is_empty() {
            status
        } else {
            format!("{status}: {line}")
        }
    }
}

/// Run `kiln ARGS` with a time limit (killed when it runs out). stdout is discarded; stderr is
/// kept through a file in `scratch` so a chatty process can never block on a full pipe.
pub fn run_kiln<S: AsRef<std::ffi::OsStr>>(args: &[S], timeout: Duration, scratch: &Path) -> Outcome {
    let start = Instant::now();
    let err_path = scratch.join("kiln.stderr");
    let spawned = File::create(&err_path).and_then(|err| {
        Command::new(kiln_bin()).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Outcome { status: None, timed_out: false, stderr: format!("spawn kiln: {e}"), elapsed: start.elapsed() }
        }
    };
    let mut pause = Duration::from_micros(200);
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(s)) => break (Some(s), false),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                break (child.wait().ok(), true);
            }
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(_) => break (None, false),
        }
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    Outcome { status, timed_out, stderr, elapsed: start.elapsed() }
}

// ------------------------------------------------------------------ .npy reading

/// Read a little-endian, C-order `.npy` file (versions 1–3) into a Tensor: f2/f4/f8, i1/i2/i4/i8,
/// u1/u2/u4/u8, b1, and strings as `U` (UTF-32) or `S` (bytes).
pub fn read_npy(path: &Path) -> Result<Tensor, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_npy(&data).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse_npy(data: &[u8]) -> Result<Tensor, String> {
    if data.len() < 10 || &data[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (header_len, start) = match data[6] {
        1 => (u16::from_le_bytes([data[8], data[9]]) as usize, 10),
        2 | 3 if data.len() >= 12 => (u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = data
        .get(start..start + header_len)
        .ok_or("truncated header")
        .and_then(|h| std::str::from_utf8(h).map_err(|_| "header is not text"))?;
    let descr = header_value(header, "descr").ok_or("header has no descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    if header_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err("fortran_order arrays are not supported".into());
    }
    let shape = parse_shape(header_value(header, "shape").ok_or("header has no shape")?)?;
    let body = &data[start + header_len..];
    let n: usize = shape.iter().product();

    let (order, code) = descr.split_at(1);
    if order == ">" && !code.ends_with('1') {
        return Err(format!("big-endian dtype {descr} is not supported"));
    }
    if let Some(width) = code.strip_prefix('U') {
        let width: usize = width.parse().map_err(|_| format!("bad dtype {descr}"))?;
        let strings = take(body, n * width * 4)?
            .chunks_exact((width * 4).max(1))
            .take(n)
            .map(|c| {
                c.chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .take_while(|&u| u != 0)
                    .map(|u| char::from_u32(u).unwrap_or('\u{fffd}'))
                    .collect()
            })
            .collect::<Vec<String>>();
        return Tensor::from_strings(&shape, pad_strings(strings, n)).map_err(|e| e.to_string());
    }
    if let Some(width) = code.strip_prefix('S') {
        let width: usize = width.parse().map_err(|_| format!("bad dtype {descr}"))?;
        let strings = take(body, n * width)?
            .chunks_exact(width.max(1))
            .take(n)
            .map(|c| {
                let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                String::from_utf8_lossy(&c[..end]).into_owned()
            })
            .collect::<Vec<String>>();
        return Tensor::from_strings(&shape, pad_strings(strings, n)).map_err(|e| e.to_string());
    }
    let dtype = match code {
        "f2" => DType::F16,
        "f4" => DType::F32,
        "f8" => DType::F64,
        "i1" => DType::I8,
        "i2" => DType::I16,
        "i4" => DType::I32,
        "i8" => DType::I64,
        "u1" => DType::U8,
        "u2" => DType::U16,
        "u4" => DType::U32,
        "u8" => DType::U64,
        "b1" => DType::Bool,
        _ => return Err(format!("unsupported dtype {descr}")),
    };
    let bytes = take(body, n * dtype.size())?;
    Tensor::from_bytes(dtype, &shape, bytes).map_err(|e| e.to_string())
}

/// Zero-width string arrays (`<U0`) hold n empty strings but no bytes.
fn pad_strings(mut v: Vec<String>, n: usize) -> Vec<String> {
    v.resize(n, String::new());
    v
}

fn take(body: &[u8], len: usize) -> Result<&[u8], String> {
    body.get(..len).ok_or_else(|| format!("data has {} bytes, expected {len}", body.len()))
}

/// The raw text of `'key': value` in a numpy header dict (value up to the next top-level comma).
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[pos + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&rest[..=i]);
                }
            }
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    Some(rest.trim())
}

fn parse_shape(s: &str) -> Result<Vec<usize>, String> {
    let inner = s.trim().trim_start_matches('(').trim_end_matches(')');
    inner
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.trim_end_matches('L').parse::<usize>().map_err(|_| format!("bad shape {s}")))
        .collect()
}

// ------------------------------------------------------------------ values for comparison

/// A tensor's elements in a form that can be compared across dtypes.
#[derive(Debug)]
pub enum Vals {
    Float(Vec<f64>),
    Int(Vec<i64>),
    Str(Vec<String>),
}

/// The dtype `kiln run` writes to .npy for a value of dtype `d`: numpy has no bfloat16, float8 or
/// float4, so those are widened to f32; 4-bit and 2-bit ints are written one per byte.
pub fn npy_dtype_for(d: DType) -> DType {
    match d {
        DType::BF16
        | DType::F8E4M3FN
        | DType::F8E4M3FNUZ
        | DType::F8E5M2
        | DType::F8E5M2FNUZ
        | DType::F4E2M1
        | DType::F8E8M0 => DType::F32,
        DType::I4 | DType::I2 => DType::I8,
        DType::U4 | DType::U2 => DType::U8,
        d => d,
    }
}

pub fn vals(t: &Tensor) -> Result<Vals, String> {
    let d = t.dtype();
    let small_float = |f: fn(u8) -> f64| Vals::Float(t.bytes().iter().map(|&b| f(b)).collect());
    Ok(match d {
        DType::String => Vals::Str(t.strings().map_err(|e| e.to_string())?.to_vec()),
        DType::F8E4M3FN => small_float(f8e4m3fn),
        DType::F8E4M3FNUZ => small_float(f8e4m3fnuz),
        DType::F8E5M2 => small_float(f8e5m2),
        DType::F8E5M2FNUZ => small_float(f8e5m2fnuz),
        DType::F4E2M1 => small_float(f4e2m1),
        DType::F8E8M0 => small_float(f8e8m0),
        d if d.is_float() => Vals::Float(t.to_f64_vec().map_err(|e| e.to_string())?),
        d if d.is_int() || d == DType::Bool => Vals::Int(t.to_i64_vec().map_err(|e| e.to_string())?),
        d => return Err(format!("cannot compare {d} tensors")),
    })
}

/// Value of a minifloat code with `e` exponent bits, `m` mantissa bits and exponent `bias`
/// (subnormals when the exponent field is 0). Special codes are handled by the callers.
fn minifloat(code: u8, e: u32, m: u32, bias: i32) -> f64 {
    let sign = if code >> (e + m) & 1 == 1 { -1.0 } else { 1.0 };
    let exp = ((code >> m) as u32 & ((1 << e) - 1)) as i32;
    let man = (code as u32 & ((1 << m) - 1)) as f64 / (1u32 << m) as f64;
    let mag = if exp == 0 { man * 2f64.powi(1 - bias) } else { (1.0 + man) * 2f64.powi(exp - bias) };
    sign * mag
}

pub fn f8e4m3fn(c: u8) -> f64 {
    if c & 0x7f == 0x7f {
        f64::NAN
    } else {
        minifloat(c, 4, 3, 7)
    }
}

pub fn f8e4m3fnuz(c: u8) -> f64 {
    if c == 0x80 {
        f64::NAN
    } else {
        minifloat(c, 4, 3, 8)
    }
}

pub fn f8e5m2(c: u8) -> f64 {
    match c & 0x7f {
        0x7c => if c & 0x80 != 0 { f64::NEG_INFINITY } else { f64::INFINITY },
        x if x > 0x7c => f64::NAN,
        _ => minifloat(c, 5, 2, 15),
    }
}

pub fn f8e5m2fnuz(c: u8) -> f64 {
    if c == 0x80 {
        f64::NAN
    } else {
        minifloat(c, 5, 2, 16)
    }
}

pub fn f4e2m1(c: u8) -> f64 {
    minifloat(c & 0x0f, 2, 1, 1)
}

pub fn f8e8m0(c: u8) -> f64 {
    if c == 0xff {
        f64::NAN
    } else {
        2f64.powi(c as i32 - 127)
    }
}

// ------------------------------------------------------------------ comparisons

/// The conformance rule: same shape, the dtype kiln writes for the reference's dtype, floats
/// within `1e-7 + 1e-3·|ref|` (NaN matches NaN, infinities must match exactly), others equal.
pub fn compare_conformance(out: &Tensor, reference: &Tensor) -> Result<(), String> {
    if out.shape() != reference.shape() {
        return Err(format!("shape {:?} != expected {:?}", out.shape(), reference.shape()));
    }
    let want = npy_dtype_for(reference.dtype());
    if out.dtype() != want {
        return Err(format!("dtype {} != expected {}", out.dtype(), want));
    }
    match (vals(out)?, vals(reference)?) {
        (Vals::Float(o), Vals::Float(r)) => {
            let bad = |(o, r): (&f64, &f64)| {
                let ok = if r.is_nan() {
                    o.is_nan()
                } else if r.is_infinite() {
                    o == r
                } else {
                    (o - r).abs() <= 1e-7 + 1e-3 * r.abs()
                };
                !ok
            };
            mismatch_report(&o, &r, bad, |x| format!("{x:e}"))
        }
        (Vals::Int(o), Vals::Int(r)) => mismatch_report(&o, &r, |(a, b)| a != b, |x| x.to_string()),
        (Vals::Str(o), Vals::Str(r)) => mismatch_report(&o, &r, |(a, b)| a != b, |x| format!("{x:?}")),
        (o, r) => Err(format!("value kinds differ: {} vs {}", kind(&o), kind(&r))),
    }
}

fn kind(v: &Vals) -> &'static str {
    match v {
        Vals::Float(_) => "float",
        Vals::Int(_) => "int",
        Vals::Str(_) => "string",
    }
}

fn mismatch_report<T>(
    out: &[T],
    reference: &[T],
    bad: impl Fn((&T, &T)) -> bool,
    show: impl Fn(&T) -> String,
) -> Result<(), String> {
    let mut count = 0usize;
    let mut first = None;
    for (i, pair) in out.iter().zip(reference).enumerate() {
        if bad(pair) {
            count += 1;
            first.get_or_insert(i);
        }
    }
    match first {
        None => Ok(()),
        Some(i) => Err(format!(
            "{count} of {} elements differ; first at flat index {i}: got {}, expected {}",
            reference.len(),
            show(&out[i]),
            show(&reference[i])
        )),
    }
}

/// How close a real model's float output is to its reference.
#[derive(Debug, Clone, Copy)]
pub struct Closeness {
    pub max_abs_diff: f64,
    pub max_abs_ref: f64,
    pub cosine: f64,
}

pub fn closeness(out: &[f64], reference: &[f64]) -> Closeness {
    let (mut max_diff, mut max_ref, mut dot, mut no, mut nr) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (&o, &r) in out.iter().zip(reference) {
        let d = (o - r).abs();
        max_diff = if d.is_nan() { f64::INFINITY } else { max_diff.max(d) };
        max_ref = max_ref.max(r.abs());
        dot += o * r;
        no += o * o;
        nr += r * r;
    }
    let cosine = if no == 0.0 && nr == 0.0 { 1.0 } else { dot / (no.sqrt() * nr.sqrt()) };
    Closeness { max_abs_diff: max_diff, max_abs_ref: max_ref, cosine: if cosine.is_nan() { 0.0 } else { cosine } }
}

/// The real-model rule: same shape and dtype; floats with max|out−ref| <= 1e-3·max(1, max|ref|)
/// and cosine >= 0.9999; other dtypes equal. Returns a one-line description either way.
pub fn compare_real(out: &Tensor, reference: &Tensor) -> Result<String, String> {
    if out.shape() != reference.shape() {
        return Err(format!("shape {:?} != expected {:?}", out.shape(), reference.shape()));
    }
    if out.dtype() != reference.dtype() {
        return Err(format!("dtype {} != expected {}", out.dtype(), reference.dtype()));
    }
    match (vals(out)?, vals(reference)?) {
        (Vals::Float(o), Vals::Float(r)) => {
            let c = closeness(&o, &r);
            let limit = 1e-3 * c.max_abs_ref.max(1.0);
            let line = format!(
                "max|diff| {:.3e} (limit {:.3e}), max|ref| {:.3e}, cosine {:.7}",
                c.max_abs_diff, limit, c.max_abs_ref, c.cosine
            );
            if c.max_abs_diff <= limit && c.cosine >= 0.9999 {
                Ok(line)
            } else {
                Err(line)
            }
        }
        (Vals::Int(o), Vals::Int(r)) => mismatch_report(&o, &r, |(a, b)| a != b, |x| x.to_string()).map(|_| "equal".into()),
        (Vals::Str(o), Vals::Str(r)) => mismatch_report(&o, &r, |(a, b)| a != b, |x| format!("{x:?}")).map(|_| "equal".into()),
        (o, r) => Err(format!("value kinds differ: {} vs {}", kind(&o), kind(&r))),
    }
}

/// `output_0.npy`, `output_1.npy`, … present in `dir` (or `.pb` with `ext = "pb"`), in K order.
pub fn numbered_files(dir: &Path, stem: &str, ext: &str) -> Vec<PathBuf> {
    (0..).map(|k| dir.join(format!("{stem}_{k}.{ext}"))).take_while(|p| p.exists()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, body: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend((header.len() as u16).to_le_bytes());
        v.extend(header.as_bytes());
        v.extend(body);
        v
    }

    #[test]
    fn reads_f32_matrix() {
        let body: Vec<u8> = [1.0f32, -2.5, 3.0, 0.0, 5.0, 6.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = parse_npy(&npy("<f4", "(2, 3)", &body)).unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.view::<f32>().unwrap(), &[1.0, -2.5, 3.0, 0.0, 5.0, 6.0]);
    }

    #[test]
    fn reads_scalar_bool_and_unicode() {
        let t = parse_npy(&npy("<i8", "()", &16000i64.to_le_bytes())).unwrap();
        assert_eq!(t.shape(), &[] as &[usize]);
        assert_eq!(t.to_i64_vec().unwrap(), vec![16000]);
        let t = parse_npy(&npy("|b1", "(3,)", &[1, 0, 1])).unwrap();
        assert_eq!(t.to_i64_vec().unwrap(), vec![1, 0, 1]);
        let body: Vec<u8> = "ab\0é\0\0".chars().flat_map(|c| (c as u32).to_le_bytes()).collect();
        let t = parse_npy(&npy("<U3", "(2,)", &body)).unwrap();
        assert_eq!(t.strings().unwrap(), &["ab".to_string(), "é".to_string()]);
    }

    #[test]
    fn minifloats() {
        assert_eq!(f8e4m3fn(0x38), 1.0);
        assert_eq!(f8e4m3fn(0x7e), 448.0);
        assert!(f8e4m3fn(0xff).is_nan());
        assert_eq!(f8e4m3fn(0x01), 2f64.powi(-9));
        assert_eq!(f8e5m2(0x3c), 1.0);
        assert_eq!(f8e5m2(0x7b), 57344.0);
        assert_eq!(f8e5m2(0xfc), f64::NEG_INFINITY);
        assert_eq!(f8e4m3fnuz(0x40), 1.0);
        assert_eq!(f8e5m2fnuz(0x40), 1.0);
        assert_eq!(f4e2m1(0x7), 6.0);
        assert_eq!(f4e2m1(0x9), -0.5);
        assert_eq!(f8e8m0(127), 1.0);
    }

    #[test]
    fn conformance_tolerance() {
        let r = Tensor::from_vec(&[3], vec![1000.0f32, f32::NAN, 0.0]).unwrap();
        let ok = Tensor::from_vec(&[3], vec![1000.9f32, f32::NAN, 1e-8]).unwrap();
        assert!(compare_conformance(&ok, &r).is_ok());
        let bad = Tensor::from_vec(&[3], vec![1001.5f32, f32::NAN, 0.0]).unwrap();
        assert!(compare_conformance(&bad, &r).unwrap_err().contains("1 of 3"));
        let wrong_shape = Tensor::from_vec(&[1, 3], vec![1000.0f32, f32::NAN, 0.0]).unwrap();
        assert!(compare_conformance(&wrong_shape, &r).is_err());
    }

    #[test]
    fn real_rule_uses_cosine_and_scale() {
        let r = Tensor::from_vec(&[2], vec![10.0f32, -10.0]).unwrap();
        let o = Tensor::from_vec(&[2], vec![10.009f32, -10.0]).unwrap();
        assert!(compare_real(&o, &r).is_ok());
        let o = Tensor::from_vec(&[2], vec![10.02f32, -10.0]).unwrap();
        assert!(compare_real(&o, &r).is_err());
    }
}
