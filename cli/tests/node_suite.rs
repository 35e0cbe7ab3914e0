//! The ONNX backend node conformance suite (onnx 1.22.0, fetched by testdata/fetch.py), run
//! through the `kiln` binary: for each case and each `test_data_set_N`,
//! `kiln run model.onnx --inputs test_data_set_N --output-dir OUT`, then every `output_K.npy` is
//! compared with the reference `output_K.pb` (floats within 1e-7 + 1e-3·|ref|, others equal).
//!
//! A per-case report goes to `target/node_suite_report.tsv`. The test fails if fewer cases pass
//! than testdata/node_suite_baseline.txt says (a number that only goes up).
//! Env: KILN_NODE_FILTER=substring runs a subset (no baseline check); KILN_NODE_JOBS=N workers
//! (default: one per core); KILN_NODE_TIMEOUT=seconds per run (default 60).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use kiln_compiler::onnx::type_proto;

fn node_dir() -> PathBuf {
    cache_dir().join("onnx-1.22.0/onnx/backend/test/data/node")
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// What each graph output is ("tensor", "sequence", …), from the model's declared types.
fn output_kinds(model: &Path) -> Result<Vec<&'static str>, String> {
    let (proto, _) = kiln_compiler::onnx::load::read_model(model).map_err(|e| format!("reading model: {e}"))?;
    let graph = proto.graph.ok_or("model has no graph")?;
    Ok(graph
        .output
        .iter()
        .map(|o| match o.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(type_proto::Value::TensorType(_)) | None => "tensor",
            Some(type_proto::Value::SequenceType(_)) => "sequence",
            Some(type_proto::Value::OptionalType(_)) => "optional",
            Some(type_proto::Value::MapType(_)) => "map",
            Some(type_proto::Value::SparseTensorType(_)) => "sparse tensor",
            Some(type_proto::Value::OpaqueType(_)) => "opaque",
        })
        .collect())
}

fn datasets(case: &Path) -> Vec<PathBuf> {
    let mut sets: Vec<(usize, PathBuf)> = std::fs::read_dir(case)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("test_data_set_")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    sets.sort();
    sets.into_iter().map(|(_, p)| p).collect()
}

/// Run one case (all its data sets); Err carries the one-line reason it failed.
fn run_case(case: &Path, scratch: &Path, timeout: Duration) -> Result<(), String> {
    let model = case.join("model.onnx");
    let kinds = output_kinds(&model)?;
    let sets = datasets(case);
    if sets.is_empty() {
        return Err("no test_data_set_N folder".into());
    }
    for set in &sets {
        let refs = numbered_files(set, "output", "pb");
        if let Some((k, kind)) = kinds.iter().enumerate().take(refs.len()).find(|(_, k)| **k != "tensor") {
            return Err(format!("output {k} is a {kind}; only tensor outputs are compared"));
        }
        let prefix = if sets.len() > 1 { format!("{}: ", set.file_name().unwrap().to_string_lossy()) } else { String::new() };
        let out_dir = scratch.join("out");
        let _ = std::fs::remove_dir_all(&out_dir);
        let args = [
            "run".as_ref(),
            model.as_os_str(),
            "--inputs".as_ref(),
            set.as_os_str(),
            "--output-dir".as_ref(),
            out_dir.as_os_str(),
            "--threads".as_ref(),
            "1".as_ref(),
        ];
        let outcome = run_kiln(&args, timeout, scratch);
        if !outcome.ok() {
            return Err(format!("{prefix}{}", outcome.reason()));
        }
        for (k, reference) in refs.iter().enumerate() {
            let out_path = out_dir.join(format!("output_{k}.npy"));
            if !out_path.exists() {
                return Err(format!("{prefix}output_{k}.npy was not written"));
            }
            let out = read_npy(&out_path).map_err(|e| format!("{prefix}output {k}: {e}"))?;
            // Big decoded tensors share the file's bytes, which need not be aligned for views.
            let want = kiln_compiler::onnx::load::decode_tensor_file(reference)
                .map_err(|e| format!("{prefix}reference output {k}: {e}"))?
                .aligned();
            compare_conformance(&out, &want).map_err(|e| format!("{prefix}output {k}: {e}"))?;
        }
    }
    Ok(())
}

struct CaseResult {
    name: String,
    result: Result<(), String>,
    seconds: f64,
}

fn one_line(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

fn write_report(results: &[CaseResult]) -> PathBuf {
    let path = target_dir().join("node_suite_report.tsv");
    let mut text = String::from("case\tresult\treason\tseconds\n");
    for r in results {
        let (status, reason) = match &r.result {
            Ok(()) => ("pass", String::new()),
            Err(e) => ("fail", one_line(e)),
        };
        text.push_str(&format!("{}\t{status}\t{reason}\t{:.2}\n", r.name, r.seconds));
    }
    if let Err(e) = std::fs::create_dir_all(target_dir()).and_then(|_| std::fs::write(&path, text)) {
        announce(&format!("node suite: cannot write {}: {e}", path.display()));
    }
    path
}

/// The most common failure reasons (numbers masked as "#" so alike failures group together):
/// what to work on next.
fn top_reasons(results: &[CaseResult], n: usize) -> Vec<(usize, String)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in results {
        if let Err(e) = &r.result {
            let mut key = String::new();
            for c in one_line(e).chars().take(90) {
                if !c.is_ascii_digit() {
                    key.push(c);
                } else if !key.ends_with('#') {
                    key.push('#');
                }
            }
            *counts.entry(key).or_default() += 1;
        }
    }
    let mut v: Vec<(usize, String)> = counts.into_iter().map(|(k, c)| (c, k)).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.truncate(n);
    v
}

fn baseline() -> usize {
    let path = workspace_dir().join("testdata/node_suite_baseline.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("{}: expected a single integer", path.display()))
}

#[test]
fn onnx_node_conformance() {
    let root = node_dir();
    require_data(&root, "the ONNX backend node test data");
    let filter = std::env::var("KILN_NODE_FILTER").ok().filter(|f| !f.is_empty());
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("read node dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    let total_available = cases.len();
    if let Some(f) = &filter {
        cases.retain(|p| p.file_name().unwrap().to_string_lossy().contains(f.as_str()));
    }
    let jobs = env_usize("KILN_NODE_JOBS")
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
        .max(1);
    let timeout = Duration::from_secs(env_usize("KILN_NODE_TIMEOUT").unwrap_or(60) as u64);

    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(cases.len()));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                let scratch = tempfile::tempdir().expect("temp dir");
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(i) else { break };
                    let t0 = Instant::now();
                    let result = run_case(case, scratch.path(), timeout);
                    let name = case.file_name().unwrap().to_string_lossy().into_owned();
                    results.lock().unwrap().push(CaseResult { name, result, seconds: t0.elapsed().as_secs_f64() });
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if d % 250 == 0 {
                        announce(&format!("node suite: {d}/{} cases run ({:.0} s)", cases.len(), start.elapsed().as_secs_f64()));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by(|a, b| a.name.cmp(&b.name));
    let report = write_report(&results);
    let passed = results.iter().filter(|r| r.result.is_ok()).count();
    let failed = results.len() - passed;

    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "node suite: most common failures:");
    for (count, reason) in top_reasons(&results, 15) {
        let _ = writeln!(err, "  {count:5}  {reason}");
    }
    let _ = writeln!(err, "node suite: report in {}", report.display());
    let _ = writeln!(
        err,
        "node suite: {passed} passed, {failed} failed of {} ({:.0} s, {jobs} jobs)",
        results.len(),
        start.elapsed().as_secs_f64()
    );
    drop(err);

    if filter.is_some() {
        return;
    }
    assert_eq!(results.len(), total_available);
    let base = baseline();
    assert!(
        passed >= base,
        "node suite regressed: {passed} cases pass, the baseline in testdata/node_suite_baseline.txt is {base} \
         (see {} for the failing cases)",
        report.display()
    );
    if passed > base {
        announce(&format!("node suite: {passed} > baseline {base}: raise testdata/node_suite_baseline.txt to {passed}"));
    }
}
