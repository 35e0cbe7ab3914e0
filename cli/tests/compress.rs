//! The compression flags end to end on the tiny convnet shipped in testdata/: each artifact is
//! compiled by the `kiln` binary and compared with the float one by `kiln compare --json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn testdata(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata").join(p)
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "kiln failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A calibration folder with two samples (the shipped input, twice).
fn calibration(dir: &Path) -> PathBuf {
    let cal = dir.join("calib");
    for s in ["s0", "s1"] {
        std::fs::create_dir_all(cal.join(s)).unwrap();
        std::fs::copy(testdata("tiny/inputs/input_0.npy"), cal.join(s).join("input_0.npy")).unwrap();
    }
    cal
}

/// Compile the tiny convnet with `flags` into `dir/name.kiln`; returns (artifact, report text).
fn compile(dir: &Path, name: &str, flags: &[&str]) -> (PathBuf, String) {
    let art = dir.join(format!("{name}.kiln"));
    let model = testdata("tiny/tiny_convnet.onnx");
    let mut args = vec!["compile", model.to_str().unwrap(), "-o", art.to_str().unwrap(), "--report"];
    args.extend_from_slice(flags);
    let text = ok(&kiln(&args));
    (art, text)
}

/// (cosine_mean, max_abs, top1) of output 0 of `b` against `a`.
fn compare(a: &Path, b: &Path) -> (f64, f64, f64) {
    let inputs = testdata("tiny/inputs");
    let out = ok(&kiln(&["compare", a.to_str().unwrap(), b.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--json"]));
    let field = |name: &str| -> f64 {
        let key = format!("\"{name}\":");
        let at = out.find(&key).unwrap_or_else(|| panic!("no {name} in {out}")) + key.len();
        out[at..].split([',', '}']).next().unwrap().parse().unwrap()
    };
    (field("cosine_mean"), field("max_abs"), field("top1"))
}

#[test]
fn static_int8_defaults_and_variants_stay_close_to_float() {
    let dir = tempfile::tempdir().unwrap();
    let cal = calibration(dir.path());
    let cal = cal.to_str().unwrap();
    let (fp32, _) = compile(dir.path(), "fp32", &[]);
    let (q, report) = compile(dir.path(), "int8", &["--quantize", "int8", "--calibration", cal]);
    assert!(report.contains("quantized 2 layers"), "{report}");
    assert!(report.contains("GPTQ weight rounding: 2 layers"), "{report}");
    assert!(report.contains("bias correction: 2 layers"), "{report}");
    let (cos, _, top1) = compare(&fp32, &q);
    assert!(cos > 0.999 && top1 == 1.0, "int8: cosine {cos}, top-1 {top1}");
    for (name, flags) in [
        ("rtn", vec!["--int8-weights", "rtn", "--smoothing", "off", "--no-bias-correction"]),
        ("alpha", vec!["--smoothing", "0.5", "--calibrator", "minmax"]),
        ("entropy", vec!["--calibrator", "entropy"]),
    ] {
        let mut all = vec!["--quantize", "int8", "--calibration", cal];
        all.extend(flags);
        let (q, _) = compile(dir.path(), name, &all);
        let (cos, _, _) = compare(&fp32, &q);
        assert!(cos > 0.99, "{name}: cosine {cos}");
    }
}

#[test]
fn int8_accuracy_budget_of_zero_keeps_every_layer_float() {
    let dir = tempfile::tempdir().unwrap();
    let cal = calibration(dir.path());
    let (fp32, _) = compile(dir.path(), "fp32", &[]);
    for mode in ["int8", "int8-dynamic"] {
        let (q, report) =
            compile(dir.path(), mode, &["--quantize", mode, "--calibration", cal.to_str().unwrap(), "--accuracy-budget", "0"]);
        assert!(report.contains("2 of 2 layers kept in float"), "{mode}: {report}");
        let (_, max_abs, _) = compare(&fp32, &q);
        assert_eq!(max_abs, 0.0, "{mode}: every layer float, so outputs are equal");
    }
}

#[test]
fn keep_float_names_layers_that_stay_float() {
    let dir = tempfile::tempdir().unwrap();
    let cal = calibration(dir.path());
    let cal = cal.to_str().unwrap();
    // By node name (fc_bias: the MatMul fused with its bias Add, as the report names layers)
    // and by first output name (logits, fc_bias's).
    let (_, report) = compile(dir.path(), "int8", &["--quantize", "int8", "--calibration", cal, "--keep-float", "fc_bias"]);
    assert!(report.contains("quantized 1 layers (0 MatMul/Gemm, 1 Conv)") && report.contains("1 by --keep-float"), "{report}");
    let (fp32, _) = compile(dir.path(), "fp32", &[]);
    let (q, report) = compile(dir.path(), "both", &["--quantize", "int8-dynamic", "--keep-float", "logits,conv2"]);
    assert!(report.contains("quantized 0 layers"), "{report}");
    assert_eq!(compare(&fp32, &q).1, 0.0, "every layer float, so outputs are equal");
    let (_, report) = compile(dir.path(), "int4", &["--quantize", "int4", "--keep-float", "logits"]);
    assert!(report.contains("kept 1 layers in float by --keep-float") && report.contains("0 MatMul-like"), "{report}");
}

#[test]
fn dynamic_int8_and_int4_stay_close_to_float() {
    let dir = tempfile::tempdir().unwrap();
    let (fp32, _) = compile(dir.path(), "fp32", &[]);
    let (q, _) = compile(dir.path(), "dyn", &["--quantize", "int8-dynamic"]);
    let (cos, _, top1) = compare(&fp32, &q);
    assert!(cos > 0.999 && top1 == 1.0, "int8-dynamic: cosine {cos}, top-1 {top1}");
    let (q, report) = compile(dir.path(), "int4", &["--quantize", "int4"]);
    assert!(report.contains("1 MatMul-like"), "{report}");
    let (cos, _, _) = compare(&fp32, &q);
    assert!(cos > 0.99, "int4: cosine {cos}");
}

#[test]
fn bad_compression_flags_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cal = calibration(dir.path());
    let model = testdata("tiny/tiny_convnet.onnx");
    let out = dir.path().join("x.kiln");
    for (flags, says) in [
        (vec!["--quantize", "int8"], "needs --calibration"),
        (vec!["--quantize", "int8", "--calibration", cal.to_str().unwrap(), "--smoothing", "2"], "--smoothing"),
        (vec!["--quantize", "int8", "--calibration", cal.to_str().unwrap(), "--int8-weights", "best"], "--int8-weights"),
        (vec!["--quantize", "int8", "--calibration", cal.to_str().unwrap(), "--calibrator", "p99"], "--calibrator"),
        (vec!["--quantize", "int4", "--block-size", "48"], "--block-size"),
        (vec!["--quantize", "int8-dynamic", "--keep-float", "conv9"], "--keep-float conv9"),
    ] {
        let mut args = vec!["compile", model.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend(&flags);
        let r = kiln(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{flags:?} succeeded");
        assert!(err.contains(says), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
        assert!(!out.exists(), "{flags:?} left a file");
    }
}
