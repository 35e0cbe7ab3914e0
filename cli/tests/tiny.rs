//! The default model shipped in testdata/: compile, run, compare with onnxruntime's golden output.

use std::path::{Path, PathBuf};
use std::process::Command;

fn testdata(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata").join(p)
}

fn read_npy_f32(p: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(p).unwrap();
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(header.contains("'<f4'"), "{header}");
    let shape_txt = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape = shape_txt.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let data = b[10 + hlen..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (shape, data)
}

#[test]
fn tiny_convnet_matches_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("tiny.kiln");
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let out = Command::new(kiln)
        .args(["compile", testdata("tiny/tiny_convnet.onnx").to_str().unwrap(), "-o"])
        .arg(&art)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let outdir = dir.path().join("out");
    let out = Command::new(kiln)
        .arg("run")
        .arg(&art)
        .arg("--inputs")
        .arg(testdata("tiny/inputs"))
        .arg("--output-dir")
        .arg(&outdir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (shape, got) = read_npy_f32(&outdir.join("output_0.npy"));
    let (gshape, want) = read_npy_f32(&testdata("tiny/golden_output_0.npy"));
    assert_eq!(shape, gshape);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-6 + 1e-4 * w.abs(), "{g} vs {w}");
    }
}
