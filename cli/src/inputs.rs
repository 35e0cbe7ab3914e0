//! Binding input files to a model's inputs: `DIR/input_K.{npy,pb}` to the K-th graph input,
//! `NAME=FILE` pairs by name. Outputs go to `OUT/output_K.npy`.

use std::path::{Path, PathBuf};

use kiln_runtime::manifest::ValueInfo;
use kiln_runtime::{Error, Result, Tensor, Value};

/// Read an input file for the input `info`: .npy, or a serialized ONNX TensorProto (.pb; also
/// SequenceProto / OptionalProto for sequence and optional inputs).
pub fn read_input(path: &Path, info: &ValueInfo) -> Result<Value> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => Ok(Value::Tensor(crate::npy::read(path)?)),
        Some("pb") => kiln_compiler::onnx::read_value_file_for(path, info),
        _ => Err(Error::Input(format!("{}: expected a .npy or .pb file", path.display()))),
    }
}

fn find_input_file(dir: &Path, k: usize) -> Option<PathBuf> {
    ["npy", "pb"].iter().map(|ext| dir.join(format!("input_{k}.{ext}"))).find(|p| p.exists())
}

/// Inputs in model order from a folder and/or NAME=FILE pairs.
pub fn gather(infos: &[&ValueInfo], dir: Option<&Path>, named: &[String]) -> Result<Vec<Value>> {
    let mut values: Vec<Option<Value>> = vec![None; infos.len()];
    if let Some(dir) = dir {
        if !dir.is_dir() {
            return Err(Error::Input(format!("{} is not a folder", dir.display())));
        }
        for (k, slot) in values.iter_mut().enumerate() {
            if let Some(p) = find_input_file(dir, k) {
                *slot = Some(read_input(&p, infos[k])?);
            }
        }
    }
    for pair in named {
        let (name, file) = pair
            .split_once('=')
            .ok_or_else(|| Error::Input(format!("--input expects NAME=FILE, got '{pair}'")))?;
        let k = infos.iter().position(|i| i.name == name).ok_or_else(|| {
            let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
            Error::Input(format!("model has no input '{name}' (inputs: {names:?})"))
        })?;
        values[k] = Some(read_input(Path::new(file), infos[k])?);
    }
    values
        .into_iter()
        .enumerate()
        .map(|(k, v)| {
            v.ok_or_else(|| {
                Error::Input(format!(
                    "no value for input {k} '{}' ({}): give input_{k}.npy in --inputs or --input {}=FILE",
                    infos[k].name,
                    infos[k].type_string(),
                    infos[k].name
                ))
            })
        })
        .collect()
}

/// Write outputs as `output_K.npy`.
pub fn write_outputs(dir: &Path, outputs: &[Value]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Input(format!("cannot create {}: {e}", dir.display())))?;
    for (k, v) in outputs.iter().enumerate() {
        let t: &Tensor = match v {
            Value::Tensor(t) => t,
            other => {
                return Err(Error::Other(format!(
                    "output {k} is a {}; only tensors can be written as .npy",
                    other.kind_name()
                )))
            }
        };
        crate::npy::write(&dir.join(format!("output_{k}.npy")), t)?;
    }
    Ok(())
}
