//! The ONNX backend conformance suites shipped in the onnx 1.22.0 wheel (fetched by
//! testdata/fetch.py): `node`, `simple`, `pytorch-converted` and `pytorch-operator`, each run
//! through the `kiln` binary. For each case and each `test_data_set_N`:
//! `kiln run model.onnx --inputs test_data_set_N --output-dir OUT`, then every output is compared
//! with the reference `output_K.pb` (floats within 1e-7 + 1e-3·|ref|, others equal). Tensors come
//! back as `output_K.npy`, sequences as folders `output_K/` of `0.npy…`, empty optionals as
//! `output_K.none` (the CLI contract in cli/src/inputs.rs).
//!
//! Each suite writes a per-case report to `target/conformance_<suite>.tsv` and fails if fewer cases
//! pass than its line in testdata/conformance_baseline.txt says (numbers that only go up).
//! Env: KILN_SUITE_FILTER=substring runs a subset (no baseline check); KILN_SUITE_JOBS=N workers
//! (default: one per core); KILN_SUITE_TIMEOUT=seconds per run (default 60).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use kiln_compiler::ir::Type;
use kiln_compiler::onnx::GraphProto;
use kiln_runtime::{Tensor, Value};

fn suite_dir(suite: &str) -> PathBuf {
    cache_dir().join("onnx-1.22.0/onnx/backend/test/data").join(suite)
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The declared type of each graph output, which says how to decode its reference file and where
/// the CLI writes it. Models the importer rejects fall back to "all tensors": the run then fails
/// with the CLI's own error, which is the one worth reporting.
fn output_types(model: &Path) -> Vec<Type> {
    match kiln_compiler::import::import_model(model) {
        Ok(m) => m.graph.outputs.iter().map(|&v| m.graph.values[v].ty.clone()).collect(),
        Err(_) => Vec::new(),
    }
}

fn read_sequence_dir(dir: &Path) -> Result<Vec<Tensor>, String> {
    let mut items = Vec::new();
    loop {
        let p = dir.join(format!("{}.npy", items.len()));
        if !p.exists() {
            return Ok(items);
        }
        items.push(read_npy(&p)?);
    }
}

fn compare_sequences(out: &[Tensor], want: &[Tensor]) -> Result<(), String> {
    if out.len() != want.len() {
        return Err(format!("sequence of {} tensors, expected {}", out.len(), want.len()));
    }
    for (i, (o, w)) in out.iter().zip(want).enumerate() {
        compare_conformance(o, &w.clone().aligned()).map_err(|e| format!("element {i}: {e}"))?;
    }
    Ok(())
}

/// Compare what the CLI wrote for output `k` (stem `out_dir/output_k`) with the reference value.
fn compare_output(out_dir: &Path, k: usize, want: &Value) -> Result<(), String> {
    let stem = format!("output_{k}");
    let npy = out_dir.join(format!("{stem}.npy"));
    let folder = out_dir.join(&stem);
    let none = out_dir.join(format!("{stem}.none"));
    let written: Vec<&str> = [(&npy, "a tensor"), (&folder, "a sequence"), (&none, "an empty optional")]
        .iter()
        .filter(|(p, _)| p.exists())
        .map(|(_, what)| *what)
        .collect();
    let want = match want {
        Value::Optional(Some(inner)) => inner.as_ref(),
        w => w,
    };
    match want {
        Value::Tensor(w) if npy.exists() => compare_conformance(&read_npy(&npy)?, &w.clone().aligned()),
        Value::Sequence(_, w) if folder.is_dir() => compare_sequences(&read_sequence_dir(&folder)?, w),
        Value::Optional(None) if none.exists() => Ok(()),
        w => Err(format!(
            "expected {} but the CLI wrote {}",
            match w {
                Value::Tensor(_) => "a tensor",
                Value::Sequence(..) => "a sequence",
                Value::Optional(_) => "an empty optional",
            },
            if written.is_empty() { "nothing".to_string() } else { written.join(" and ") }
        )),
    }
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
    let types = output_types(&model);
    let sets = datasets(case);
    if sets.is_empty() {
        return Err("no test_data_set_N folder".into());
    }
    for set in &sets {
        let refs = numbered_files(set, "output", "pb");
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
            let want = match types.get(k) {
                Some(ty @ (Type::Sequence(_) | Type::Optional(_))) => kiln_compiler::onnx::load::decode_value_file(reference, ty),
                _ => kiln_compiler::onnx::load::decode_tensor_file(reference).map(Value::Tensor),
            }
            .map_err(|e| format!("{prefix}reference output {k}: {e}"))?;
            compare_output(&out_dir, k, &want).map_err(|e| format!("{prefix}output {k}: {e}"))?;
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

fn write_report(suite: &str, results: &[CaseResult]) -> PathBuf {
    let path = target_dir().join(format!("conformance_{suite}.tsv"));
    let mut text = String::from("case\tresult\treason\tseconds\n");
    for r in results {
        let (status, reason) = match &r.result {
            Ok(()) => ("pass", String::new()),
            Err(e) => ("fail", one_line(e)),
        };
        text.push_str(&format!("{}\t{status}\t{reason}\t{:.2}\n", r.name, r.seconds));
    }
    if let Err(e) = std::fs::create_dir_all(target_dir()).and_then(|_| std::fs::write(&path, text)) {
        announce(&format!("{suite} suite: cannot write {}: {e}", path.display()));
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

const BASELINE_FILE: &str = "testdata/conformance_baseline.txt";

/// The committed number of passing cases for `suite` (lines "suite count"; # comments).
fn baseline(suite: &str) -> usize {
    let path = workspace_dir().join(BASELINE_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|l| {
            let (name, n) = l.split_once(char::is_whitespace)?;
            (name == suite).then(|| n.trim().parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("{}: no line '{suite} <count>'", path.display()))
}

fn run_suite(suite: &str) {
    let root = suite_dir(suite);
    require_data(&root, &format!("the ONNX backend '{suite}' test data"));
    let filter = std::env::var("KILN_SUITE_FILTER").ok().filter(|f| !f.is_empty());
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("read suite dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    let total_available = cases.len();
    if let Some(f) = &filter {
        cases.retain(|p| p.file_name().unwrap().to_string_lossy().contains(f.as_str()));
    }
    let jobs = env_usize("KILN_SUITE_JOBS")
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
        .max(1);
    let timeout = Duration::from_secs(env_usize("KILN_SUITE_TIMEOUT").unwrap_or(60) as u64);

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
                        announce(&format!("{suite} suite: {d}/{} cases run ({:.0} s)", cases.len(), start.elapsed().as_secs_f64()));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by(|a, b| a.name.cmp(&b.name));
    let report = write_report(suite, &results);
    let passed = results.iter().filter(|r| r.result.is_ok()).count();
    let failed = results.len() - passed;

    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{suite} suite: most common failures:");
    for (count, reason) in top_reasons(&results, 15) {
        let _ = writeln!(err, "  {count:5}  {reason}");
    }
    let _ = writeln!(err, "{suite} suite: report in {}", report.display());
    let _ = writeln!(
        err,
        "{suite} suite: {passed} passed, {failed} failed of {} ({:.0} s, {jobs} jobs)",
        results.len(),
        start.elapsed().as_secs_f64()
    );
    drop(err);

    if filter.is_some() {
        return;
    }
    assert_eq!(results.len(), total_available);
    let base = baseline(suite);
    assert!(
        passed >= base,
        "{suite} suite regressed: {passed} cases pass, the baseline in {BASELINE_FILE} is {base} \
         (see {} for the failing cases)",
        report.display()
    );
    if passed > base {
        announce(&format!("{suite} suite: {passed} > baseline {base}: raise its line in {BASELINE_FILE} to {passed}"));
    }
    if suite == "node" {
        check_op_coverage(&root, &results);
    }
}

/// (domain, op) of every node in a graph and its subgraphs; "ai.onnx" is spelled "".
fn collect_ops(g: &GraphProto, out: &mut BTreeSet<(String, String)>) {
    for n in &g.node {
        let domain = if n.domain == "ai.onnx" { String::new() } else { n.domain.clone() };
        out.insert((domain, n.op_type.clone()));
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                collect_ops(sub, out);
            }
        }
    }
}

const UNIT_TESTED_FILE: &str = "testdata/ops_unit_tested.txt";

/// Every op the CPU backend registers must have a reference test: a passing node-suite case whose
/// model uses it, or a unit test listed in testdata/ops_unit_tested.txt ("domain:Op test_name",
/// the test being a `fn test_name` somewhere under backends/src).
fn check_op_coverage(root: &Path, results: &[CaseResult]) {
    let mut covered = BTreeSet::new();
    for r in results.iter().filter(|r| r.result.is_ok()) {
        if let Ok((proto, _)) = kiln_compiler::onnx::load::read_model(&root.join(&r.name).join("model.onnx")) {
            if let Some(g) = &proto.graph {
                collect_ops(g, &mut covered);
            }
        }
    }
    let listed_path = workspace_dir().join(UNIT_TESTED_FILE);
    let listed_text = std::fs::read_to_string(&listed_path).unwrap_or_else(|e| panic!("{}: {e}", listed_path.display()));
    let mut sources = String::new();
    let mut stack = vec![workspace_dir().join("backends/src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                sources.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    let mut unit_tested = BTreeSet::new();
    for line in listed_text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let mut parts = line.split_whitespace();
        let (Some(op), Some(test)) = (parts.next(), parts.next()) else {
            panic!("{UNIT_TESTED_FILE}: expected 'domain:Op test_name', got '{line}'");
        };
        assert!(sources.contains(&format!("fn {test}(")), "{UNIT_TESTED_FILE}: no `fn {test}` under backends/src (for {op})");
        let (domain, op) = op.split_once(':').unwrap_or(("", op));
        unit_tested.insert((domain.to_string(), op.to_string()));
    }
    let missing: Vec<String> = kiln_backends::cpu::registry()
        .ops()
        .into_iter()
        .map(|(d, o)| (if d == "ai.onnx" { "" } else { d }.to_string(), o.to_string()))
        .filter(|k| !covered.contains(k) && !unit_tested.contains(k))
        .map(|(d, o)| format!("{d}:{o}"))
        .collect();
    assert!(
        missing.is_empty(),
        "ops with neither a passing node-suite case nor a unit test listed in {UNIT_TESTED_FILE}: {missing:?}"
    );
}

#[test]
fn onnx_node_suite() {
    run_suite("node");
}

#[test]
fn onnx_simple_suite() {
    run_suite("simple");
}

#[test]
fn onnx_pytorch_converted_suite() {
    run_suite("pytorch-converted");
}

#[test]
fn onnx_pytorch_operator_suite() {
    run_suite("pytorch-operator");
}
