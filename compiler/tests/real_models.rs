//! End to end on real models from the local cache (skipped when absent): import, infer, dump,
//! lower, write, read back. Run with `cargo test -p kiln-compiler --test real_models -- --ignored --nocapture`.

use std::path::Path;

use kiln_compiler::dump::dump;
use kiln_compiler::import::import_model;
use kiln_compiler::infer::infer_types;
use kiln_compiler::ir::{Graph, Type};
use kiln_compiler::lower::lower;
use kiln_compiler::writer::write_artifact;
use kiln_runtime::Artifact;

const MODELS: &str = "/root/.cache/kiln/models";

/// (values, values without a dtype, values without a shape), subgraphs included.
fn coverage(g: &Graph) -> (usize, usize, usize) {
    let mut c = (0, 0, 0);
    let produced: Vec<usize> = g
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().flatten().copied())
        .collect();
    for v in produced {
        c.0 += 1;
        let ty = &g.values[v].ty;
        if ty.dtype().is_none() && !matches!(ty, Type::Sequence(_) | Type::Optional(_)) {
            c.1 += 1;
        }
        if ty.shape().is_none() && !matches!(ty, Type::Sequence(_) | Type::Optional(_)) {
            c.2 += 1;
        }
    }
    for n in &g.nodes {
        for sg in n.subgraphs() {
            let s = coverage(sg);
            c = (c.0 + s.0, c.1 + s.1, c.2 + s.2);
        }
    }
    c
}

#[test]
#[ignore]
fn real_models_compile_and_read_back() {
    let Ok(dir) = std::fs::read_dir(MODELS) else {
        eprintln!("{MODELS} not found; skipped");
        return;
    };
    let out_dir = tempfile::tempdir().unwrap();
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "onnx") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let mut m = import_model(&path).unwrap();
        infer_types(&mut m).unwrap();
        let (n, no_dtype, no_shape) = coverage(&m.graph);
        let text = dump(&m);
        if let Ok(d) = std::env::var("DUMP_DIR") {
            std::fs::write(Path::new(&d).join(format!("{name}.txt")), &text).unwrap();
        }
        let low = lower(&m, "cpu-generic", &[]).unwrap();
        let file = out_dir.path().join(format!("{name}.kiln"));
        let bytes = write_artifact(&low, &file).unwrap();
        let art = Artifact::open(&file).unwrap();
        assert_eq!(art.program().steps.len(), m.graph.nodes.len());
        eprintln!(
            "{name}: {n} values, {no_dtype} without dtype, {no_shape} without shape; {} dump lines; {bytes} bytes, {} blobs",
            text.lines().count(),
            art.manifest().blobs.len()
        );
    }
}
