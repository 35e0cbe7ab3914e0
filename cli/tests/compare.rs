//! `kiln compare` on the tiny model: identical models agree exactly, a perturbed copy diverges
//! at the layer that was changed, and models with other inputs or outputs are refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn testdata(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata").join(p)
}

fn kiln(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap()
}

fn compare(a: &Path, b: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec!["compare".as_ref(), a.as_os_str(), b.as_os_str()];
    let inputs = testdata("tiny/inputs");
    args.extend([std::ffi::OsStr::new("--inputs"), inputs.as_os_str()]);
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    kiln(&args)
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tiny() -> PathBuf {
    testdata("tiny/tiny_convnet.onnx")
}

/// A copy of the tiny model with `f` applied to its bytes.
fn variant(dir: &Path, name: &str, f: impl Fn(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(tiny()).unwrap();
    f(&mut bytes);
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn replace_all(bytes: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut found = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            found += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(found > 0, "pattern not found");
}

/// The stored bytes of initializer `name`.
fn initializer_bytes(name: &str) -> Vec<u8> {
    let m = kiln_compiler::import::import_model(&tiny()).unwrap();
    let v = m.graph.values.iter().find(|v| v.name == name).unwrap();
    v.konst.as_ref().unwrap().bytes().to_vec()
}

#[test]
fn identical_models_agree() {
    let j = json(&compare(&tiny(), &tiny(), &["--json"]));
    assert_eq!(j["samples"], 1);
    let o = &j["outputs"][0];
    assert_eq!(o["name"], "probs");
    assert!((o["cosine_mean"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    assert_eq!(o["max_abs"].as_f64().unwrap(), 0.0);
    assert_eq!(o["top1"].as_f64().unwrap(), 1.0);
}

#[test]
fn onnx_against_its_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("tiny.kiln");
    let out = kiln(&["compile".as_ref(), tiny().as_os_str(), "-o".as_ref(), art.as_os_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j = json(&compare(&tiny(), &art, &["--json", "--per-layer"]));
    let o = &j["outputs"][0];
    assert!(o["cosine_min"].as_f64().unwrap() > 1.0 - 1e-9);
    assert!(o["max_abs"].as_f64().unwrap() < 1e-5);
    let pl = &j["per_layer"];
    assert!(pl["compared"].as_u64().unwrap() >= 1, "{pl}");
    assert_eq!(pl["diverging"], 0, "{pl}");
    // the text form names the output
    let out = compare(&tiny(), &art, &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("probs"));
}

#[test]
fn perturbed_layer_is_the_first_to_diverge() {
    let dir = tempfile::tempdir().unwrap();
    let old = initializer_bytes("conv2_b");
    let new: Vec<u8> = old
        .chunks(4)
        .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) + 0.75).to_le_bytes())
        .collect();
    let b = variant(dir.path(), "perturbed.onnx", |bytes| replace_all(bytes, &old, &new));
    let j = json(&compare(&tiny(), &b, &["--json", "--per-layer", "--top", "3"]));
    let o = &j["outputs"][0];
    assert!(o["cosine_mean"].as_f64().unwrap() < 0.99999, "{o}");
    assert!(o["max_abs"].as_f64().unwrap() > 0.0);
    let pl = &j["per_layer"];
    // c1, r1, p1 agree; conv2's output c2 is the first value that differs
    assert!(pl["compared"].as_u64().unwrap() >= 6, "{pl}");
    assert_eq!(pl["first"][0]["name"], "c2", "{pl}");
    assert_eq!(pl["first"][0]["op"], "Conv");
    assert!(pl["first"].as_array().unwrap().len() <= 3);
    let text = compare(&tiny(), &b, &["--per-layer"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("first diverging"));
}

#[test]
fn refuses_models_with_other_inputs_or_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let other_in = variant(dir.path(), "in.onnx", |b| replace_all(b, b"image", b"imagf"));
    let out = compare(&tiny(), &other_in, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("different inputs"), "{}", String::from_utf8_lossy(&out.stderr));
    let other_out = variant(dir.path(), "out.onnx", |b| replace_all(b, b"probs", b"probz"));
    let out = compare(&tiny(), &other_out, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("different outputs"));
    // no samples
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = kiln(&["compare".as_ref(), tiny().as_os_str(), tiny().as_os_str(), "--inputs".as_ref(), empty.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no samples"));
}
