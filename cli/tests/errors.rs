//! Bad input must give a clear one-line error and exit code 1 or 2, never a panic or a partial file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("kiln runs")
}

fn testdata(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata").join(p)
}

/// Exit 1 or 2, one `kiln: error:` line on stderr mentioning `needle`, no panic.
fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().expect("exited, not killed by a signal");
    assert!(code == 1 || code == 2, "exit code {code}, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "stderr does not mention '{needle}': {stderr}"
    );
}

#[test]
fn truncated_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(testdata("tiny/tiny_convnet.onnx")).unwrap();
    let p = dir.path().join("truncated.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let out_path = dir.path().join("out.kiln");
    let out = kiln(&["compile", p.to_str().unwrap(), "-o", out_path.to_str().unwrap()]);
    assert_clean_failure(&out, "error");
    assert!(!out_path.exists(), "a failed compile must not leave an artifact");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp files left behind");
}

#[test]
fn wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("noise.onnx");
    std::fs::write(&p, b"\xff\xfe this is not protobuf at all \x00\x01\x02").unwrap();
    assert_clean_failure(&kiln(&["compile", p.to_str().unwrap()]), "onnx");
    let k = dir.path().join("noise.kiln");
    std::fs::write(&k, b"KILNARTX garbage").unwrap();
    assert_clean_failure(&kiln(&["inspect", k.to_str().unwrap()]), "error");
}

#[test]
fn cyclic_graph() {
    assert_clean_failure(&kiln(&["compile", testdata("bad/cyclic.onnx").to_str().unwrap()]), "cycl");
}

#[test]
fn node_reads_missing_value() {
    assert_clean_failure(
        &kiln(&["compile", testdata("bad/missing_input.onnx").to_str().unwrap()]),
        "nowhere",
    );
}

#[test]
fn unsupported_op_is_named() {
    let out = kiln(&["compile", testdata("bad/unsupported_op.onnx").to_str().unwrap()]);
    assert_clean_failure(&out, "FrobnicateTensor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("com.example") && stderr.contains("frob"), "{stderr}");
}

#[test]
fn corrupted_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("tiny.kiln");
    let out = kiln(&[
        "compile",
        testdata("tiny/tiny_convnet.onnx").to_str().unwrap(),
        "-o",
        art.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut bytes = std::fs::read(&art).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let bad = dir.path().join("bad.kiln");
    std::fs::write(&bad, &bytes).unwrap();
    assert_clean_failure(&kiln(&["inspect", bad.to_str().unwrap()]), "checksum");
    // Truncated.
    std::fs::write(&bad, &bytes[..bytes.len() - 100]).unwrap();
    assert_clean_failure(&kiln(&["inspect", bad.to_str().unwrap()]), "truncated");
    // Version mismatch: the version field is checked before the checksum, so the message says
    // what is actually wrong.
    let mut v = std::fs::read(&art).unwrap();
    v[8] = 99;
    std::fs::write(&bad, &v).unwrap();
    assert_clean_failure(&kiln(&["inspect", bad.to_str().unwrap()]), "version");
}

fn write_f64_npy(path: &Path, shape: &[usize]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut h = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': ({}), }}", dims.join(", "));
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, shape.iter().product::<usize>() * 8));
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn wrong_input_shape_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let model = testdata("tiny/tiny_convnet.onnx");
    let npy = dir.path().join("x.npy");
    write_f64_npy(&npy, &[1, 1, 28, 28]);
    let arg = format!("image={}", npy.display());
    assert_clean_failure(&kiln(&["run", model.to_str().unwrap(), "--input", &arg]), "image");
    assert_clean_failure(&kiln(&["run", model.to_str().unwrap()]), "image");
}

#[test]
fn every_verb_has_help() {
    for verb in ["compile", "run", "inspect", "bench"] {
        let out = kiln(&[verb, "--help"]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
}

#[test]
fn closed_stdout_is_not_a_panic() {
    // `kiln inspect x.kiln | head`: the reader goes away before kiln writes. kiln must end like
    // any Unix tool (SIGPIPE or a clean exit), not print a panic.
    use std::io::Read;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("tiny.kiln");
    let out = kiln(&["compile", testdata("tiny/tiny_convnet.onnx").to_str().unwrap(), "-o", art.to_str().unwrap()]);
    assert!(out.status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["inspect", art.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
}
