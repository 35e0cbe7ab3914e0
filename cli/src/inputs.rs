//! Binding input files to a model's inputs: `DIR/input_K.{npy,pb}` to the K-th graph input,
//! `NAME=FILE` pairs by name. Outputs go to `OUT/output_K.npy`.
//!
//! Values that are not tensors use the file system's own structure, so that no tool beyond numpy is
//! needed to read them: a sequence is a folder `output_K/` holding `0.npy`, `1.npy`, … (an empty
//! folder for an empty sequence); an empty optional is an empty marker file `output_K.none`; a
//! present optional is written as the value it holds. Inputs accept the same forms.

use std::path::{Path, PathBuf};

use kiln_runtime::manifest::ValueInfo;
use kiln_runtime::{DType, Error, Result, Value};

/// Read an input file for the input `info`: .npy, or a serialized ONNX TensorProto (.pb; also
/// SequenceProto / OptionalProto for sequence and optional inputs).
pub fn read_input(path: &Path, info: &ValueInfo) -> Result<Value> {
    use kiln_runtime::manifest::ValueKind;
    let value = match path.extension().and_then(|e| e.to_str()) {
        _ if path.is_dir() => read_sequence_dir(path, DType::from_onnx(info.dtype))?,
        Some("npy") => Value::Tensor(crate::npy::read(path)?),
        Some("pb") => kiln_compiler::onnx::read_value_file_for(path, info)?,
        Some("none") => return Ok(Value::Optional(None)),
        _ => {
            return Err(Error::Input(format!(
                "{}: expected a .npy or .pb file, a .none marker or a folder of .npy files",
                path.display()
            )))
        }
    };
    // An optional input given as the value it holds.
    Ok(match (info.kind(), value) {
        (ValueKind::Optional, v @ (Value::Tensor(_) | Value::Sequence(..))) => Value::Optional(Some(Box::new(v))),
        (_, v) => v,
    })
}

/// A folder of `0.npy`, `1.npy`, … as a sequence (`dtype` types an empty one).
fn read_sequence_dir(dir: &Path, dtype: Option<DType>) -> Result<Value> {
    let mut items = Vec::new();
    while let Some(p) = Some(dir.join(format!("{}.npy", items.len()))).filter(|p| p.exists()) {
        items.push(crate::npy::read(&p)?);
    }
    let extra = std::fs::read_dir(dir)
        .map_err(|e| Error::Input(format!("cannot read {}: {e}", dir.display())))?
        .count();
    if extra != items.len() {
        return Err(Error::Input(format!(
            "{}: a sequence folder must hold exactly 0.npy … N-1.npy ({} entries, {} numbered from 0)",
            dir.display(),
            extra,
            items.len()
        )));
    }
    let dtype = items.first().map(|t| t.dtype()).or(dtype).unwrap_or(DType::F32);
    if let Some(bad) = items.iter().find(|t| t.dtype() != dtype) {
        return Err(Error::Input(format!("{}: the sequence mixes {dtype} and {} tensors", dir.display(), bad.dtype())));
    }
    Ok(Value::Sequence(dtype, items))
}

fn find_input_file(dir: &Path, k: usize) -> Option<PathBuf> {
    let stem = format!("input_{k}");
    ["npy", "pb", "none"]
        .iter()
        .map(|ext| dir.join(format!("{stem}.{ext}")))
        .chain([dir.join(&stem)])
        .find(|p| p.exists())
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

/// Write outputs as `output_K.npy` (sequences as folders, empty optionals as `.none` markers).
pub fn write_outputs(dir: &Path, outputs: &[Value]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Input(format!("cannot create {}: {e}", dir.display())))?;
    for (k, v) in outputs.iter().enumerate() {
        write_value(dir, &format!("output_{k}"), v)?;
    }
    Ok(())
}

fn write_value(dir: &Path, stem: &str, v: &Value) -> Result<()> {
    match v {
        Value::Tensor(t) => crate::npy::write(&dir.join(format!("{stem}.npy")), t),
        Value::Optional(None) => crate::fsutil::write_atomic(&dir.join(format!("{stem}.none")), b""),
        Value::Optional(Some(inner)) => write_value(dir, stem, inner),
        Value::Sequence(_, items) => {
            // Filled under a temporary name and renamed, so a reader never sees half a sequence.
            let target = dir.join(stem);
            let tmp = dir.join(format!(".{stem}.tmp{}", std::process::id()));
            let io = |e: std::io::Error, p: &Path| Error::Input(format!("cannot write {}: {e}", p.display()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| io(e, &tmp))?;
            let filled = items.iter().enumerate().try_for_each(|(i, t)| crate::npy::write(&tmp.join(format!("{i}.npy")), t));
            if let Err(e) = filled {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            if target.is_dir() {
                std::fs::remove_dir_all(&target).map_err(|e| io(e, &target))?;
            }
            std::fs::rename(&tmp, &target).map_err(|e| io(e, &target))
        }
    }
}
