//! Loading ONNX files: memory-map, decode without copying weight bytes, hash the source, and
//! resolve external tensor data inside the model's folder only.
//!
//! The whole file is wrapped in one `bytes::Bytes` owning the map, so every `raw_data` decoded from
//! it is a slice of the map. External data files are mapped once each and sliced the same way.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use kiln_runtime::{DType, Error, Result, Tensor, Value};
use prost::Message;
use sha2::{Digest, Sha256};

use super::proto::{
    DataLocation, ModelProto, OptionalProto, SequenceProto, TensorProto, ValueKind,
};
use super::tensor::{sparse_to_tensor, to_tensor};
use crate::ir::Type;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidModel(msg.into())
}

/// The file's bytes, memory-mapped and owned by the returned `Bytes` (slices share the map).
pub fn map_file(path: &Path) -> Result<Bytes> {
    let file = File::open(path).map_err(|e| {
        Error::Io(std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    })?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the map is read-only; like every mmap-based loader we rely on the file not being
    // truncated while the model is in use.
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    Ok(Bytes::from_owner(map))
}

/// Lower-case hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decode a model from bytes (weights stay slices of `bytes`).
pub fn decode_model(bytes: Bytes, what: &str) -> Result<ModelProto> {
    if bytes.is_empty() {
        return Err(invalid(format!("not an ONNX model: {what} is empty")));
    }
    let model = ModelProto::decode(bytes)
        .map_err(|e| invalid(format!("not an ONNX model: {what}: {e}")))?;
    if model.graph.is_none() {
        return Err(invalid(format!("not an ONNX model: {what} has no graph")));
    }
    if model.ir_version <= 0 {
        return Err(invalid(format!(
            "not an ONNX model: {what} has ir_version {}",
            model.ir_version
        )));
    }
    Ok(model)
}

/// Memory-map and decode an ONNX model; also returns the file's hex sha256.
pub fn read_model(path: &Path) -> Result<(ModelProto, String)> {
    let bytes = map_file(path)?;
    let sha = sha256_hex(&bytes);
    let model = decode_model(bytes, &path.display().to_string())?;
    Ok((model, sha))
}

/// Resolves `data_location = EXTERNAL` tensors against one folder, mapping each data file once.
///
/// Paths are confined to the folder: absolute paths, `..` escapes and symlinks leading outside are
/// rejected, since a model file must not be able to make kiln read arbitrary files.
pub struct ExternalStore {
    dir: Option<PathBuf>,
    maps: RefCell<HashMap<PathBuf, Bytes>>,
}

impl ExternalStore {
    /// Resolve external data relative to `dir` (the folder holding the model).
    pub fn new(dir: &Path) -> ExternalStore {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        ExternalStore { dir: Some(dir.to_path_buf()), maps: RefCell::default() }
    }

    /// A store that refuses external data (for in-memory models).
    pub fn none() -> ExternalStore {
        ExternalStore { dir: None, maps: RefCell::default() }
    }

    /// The bytes of an external tensor (a zero-copy slice of the mapped data file).
    pub fn resolve(&self, t: &TensorProto) -> Result<Bytes> {
        let name = &t.name;
        let mut location = None;
        let mut offset = 0u64;
        let mut length = None;
        for e in &t.external_data {
            match e.key.as_str() {
                "location" => location = Some(e.value.as_str()),
                "offset" => offset = parse_u64(name, "offset", &e.value)?,
                "length" => length = Some(parse_u64(name, "length", &e.value)?),
                _ => {}
            }
        }
        let location = location
            .ok_or_else(|| invalid(format!("tensor '{name}': external data without a location")))?;
        let Some(dir) = &self.dir else {
            return Err(invalid(format!(
                "tensor '{name}': external data '{location}' but the model has no folder"
            )));
        };
        let path = confine(dir, location)
            .map_err(|why| invalid(format!("tensor '{name}': external data '{location}' {why}")))?;
        let data = self.map(&path)?;
        let total = data.len() as u64;
        let length = length.unwrap_or(total.saturating_sub(offset));
        match offset.checked_add(length) {
            Some(end) if end <= total => Ok(data.slice(offset as usize..end as usize)),
            _ => Err(invalid(format!(
                "tensor '{name}': external data [{offset}, +{length}) lies outside '{location}' \
                 ({total} bytes)"
            ))),
        }
    }

    fn map(&self, path: &Path) -> Result<Bytes> {
        if let Some(b) = self.maps.borrow().get(path) {
            return Ok(b.clone());
        }
        let b = map_file(path)?;
        self.maps.borrow_mut().insert(path.to_path_buf(), b.clone());
        Ok(b)
    }
}

fn parse_u64(tensor: &str, key: &str, v: &str) -> Result<u64> {
    v.trim().parse().map_err(|_| {
        invalid(format!("tensor '{tensor}': external data {key} '{v}' is not a number"))
    })
}

/// `dir/location`, canonicalized, if it is a regular file inside `dir`.
fn confine(dir: &Path, location: &str) -> std::result::Result<PathBuf, String> {
    let rel = Path::new(location);
    if location.is_empty() {
        return Err("is empty".into());
    }
    if rel.is_absolute()
        || location.starts_with('/')
        || location.starts_with('\\')
        || rel.components().any(|c| matches!(c, Component::Prefix(_) | Component::RootDir))
    {
        return Err("is an absolute path (must be relative to the model's folder)".into());
    }
    let root = dir.canonicalize().map_err(|e| format!("cannot open the model's folder: {e}"))?;
    let full = root.join(rel).canonicalize().map_err(|e| format!("cannot be opened: {e}"))?;
    if !full.starts_with(&root) {
        return Err("resolves outside the model's folder".into());
    }
    if !full.is_file() {
        return Err("is not a regular file".into());
    }
    Ok(full)
}

/// Whether a tensor's data lives in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == DataLocation::External as i32
}

/// Decode a standalone serialized TensorProto (e.g. a test-data `input_0.pb`).
pub fn decode_tensor_file(path: &Path) -> Result<Tensor> {
    let bytes = map_file(path)?;
    let t = TensorProto::decode(bytes)
        .map_err(|e| invalid(format!("not a TensorProto: {}: {e}", path.display())))?;
    to_tensor(&t, &store_beside(path))
}

/// Decode a standalone serialized SequenceProto of tensors. `dtype` is used for an empty sequence
/// (whose element type the file does not record); F32 if not given.
pub fn decode_sequence_file(path: &Path, dtype: Option<DType>) -> Result<Value> {
    let bytes = map_file(path)?;
    let s = SequenceProto::decode(bytes)
        .map_err(|e| invalid(format!("not a SequenceProto: {}: {e}", path.display())))?;
    sequence_value(&s, dtype, &store_beside(path))
}

/// Decode a standalone serialized OptionalProto (of a tensor or a sequence of tensors).
pub fn decode_optional_file(path: &Path, elem: Option<&Type>) -> Result<Value> {
    let bytes = map_file(path)?;
    let o = OptionalProto::decode(bytes)
        .map_err(|e| invalid(format!("not an OptionalProto: {}: {e}", path.display())))?;
    optional_value(&o, elem, &store_beside(path))
}

/// Decode a test-data file according to the declared type of the value it feeds.
pub fn decode_value_file(path: &Path, ty: &Type) -> Result<Value> {
    match ty {
        Type::Sequence(elem) => decode_sequence_file(path, elem.dtype()),
        Type::Optional(elem) => decode_optional_file(path, Some(elem)),
        _ => decode_tensor_file(path).map(Value::Tensor),
    }
}

/// Decode a test-data `.pb` file without knowing its type: a TensorProto if it is one, else a
/// SequenceProto or OptionalProto. Sequence and optional files are ambiguous on the wire (one
/// tensor in a sequence encodes exactly like an optional tensor): with one or no tensor this
/// guesses "sequence", and an element kind of sequence/optional means "optional" (kiln has no
/// nested sequences). Use `decode_value_file` when the declared type is known.
pub fn read_value_file(path: &Path) -> Result<Value> {
    let bytes = map_file(path)?;
    let ext = store_beside(path);
    // Read as a TensorProto, a sequence or optional almost never has a data count that matches
    // its (garbage) dims, so a tensor that converts cleanly is taken as one.
    let as_tensor = TensorProto::decode(bytes.clone())
        .map_err(|e| invalid(format!("not a TensorProto: {}: {e}", path.display())))
        .and_then(|t| to_tensor(&t, &ext));
    let tensor_err = match as_tensor {
        Ok(t) => return Ok(Value::Tensor(t)),
        Err(e) => e,
    };
    let Ok(s) = SequenceProto::decode(bytes.clone()) else { return Err(tensor_err) };
    match s.elem_type {
        // Empty optional, or an optional of a sequence/optional (kiln has no nested sequences).
        0 | 3 | 5 => {
            let Ok(o) = OptionalProto::decode(bytes) else { return Err(tensor_err) };
            optional_value(&o, None, &ext).map_err(|_| tensor_err)
        }
        1 | 2 => sequence_value(&s, None, &ext).map_err(|_| tensor_err),
        _ => Err(tensor_err),
    }
}

/// Decode a test-data `.pb` file feeding a value of an artifact's declared kind (tensor, sequence
/// or optional), which settles the wire-level ambiguity `read_value_file` has to guess at.
pub fn read_value_file_for(path: &Path, info: &kiln_runtime::manifest::ValueInfo) -> Result<Value> {
    use kiln_runtime::manifest::ValueKind as K;
    match info.kind() {
        K::Tensor => decode_tensor_file(path).map(Value::Tensor),
        K::Sequence => decode_sequence_file(path, DType::from_onnx(info.dtype)),
        K::Optional => decode_optional_file(path, None),
        K::Unknown => read_value_file(path),
    }
}

fn store_beside(path: &Path) -> ExternalStore {
    ExternalStore::new(path.parent().unwrap_or(Path::new(".")))
}

/// A SequenceProto as a runtime sequence value (sequences of tensors only).
pub fn sequence_value(
    s: &SequenceProto,
    dtype: Option<DType>,
    ext: &ExternalStore,
) -> Result<Value> {
    let kind = ValueKind::try_from(s.elem_type).unwrap_or(ValueKind::Undefined);
    let mut items = Vec::new();
    match kind {
        ValueKind::Tensor => {
            for t in &s.tensor_values {
                items.push(to_tensor(t, ext)?);
            }
        }
        ValueKind::SparseTensor => {
            for t in &s.sparse_tensor_values {
                items.push(sparse_to_tensor(t, ext)?);
            }
        }
        ValueKind::Undefined if s.tensor_values.is_empty() && s.sparse_tensor_values.is_empty() => {
        }
        other => {
            return Err(Error::Other(format!(
                "sequence '{}' of {other:?} elements is not supported (only tensors)",
                s.name
            )))
        }
    }
    let dtype = items.first().map(|t| t.dtype()).or(dtype).unwrap_or(DType::F32);
    if let Some(bad) = items.iter().find(|t| t.dtype() != dtype) {
        return Err(invalid(format!(
            "sequence '{}' mixes {dtype} and {} tensors",
            s.name,
            bad.dtype()
        )));
    }
    Ok(Value::Sequence(dtype, items))
}

/// An OptionalProto as a runtime optional value.
pub fn optional_value(
    o: &OptionalProto,
    elem: Option<&Type>,
    ext: &ExternalStore,
) -> Result<Value> {
    let kind = ValueKind::try_from(o.elem_type).unwrap_or(ValueKind::Undefined);
    let inner = match kind {
        ValueKind::Tensor => o.tensor_value.as_ref().map(|t| to_tensor(t, ext).map(Value::Tensor)),
        ValueKind::SparseTensor => {
            o.sparse_tensor_value.as_ref().map(|t| sparse_to_tensor(t, ext).map(Value::Tensor))
        }
        ValueKind::Sequence => o.sequence_value.as_ref().map(|s| {
            let hint = match elem {
                Some(Type::Sequence(e)) => e.dtype(),
                _ => None,
            };
            sequence_value(s, hint, ext)
        }),
        ValueKind::Optional => o.optional_value.as_ref().map(|inner| {
            let hint = match elem {
                Some(Type::Optional(e)) => Some(e.as_ref()),
                _ => None,
            };
            optional_value(inner, hint, ext)
        }),
        ValueKind::Undefined => None,
        ValueKind::Map => {
            return Err(Error::Other(format!("optional '{}' of a map is not supported", o.name)))
        }
    };
    Ok(Value::Optional(inner.transpose()?.map(Box::new)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{GraphProto, StringStringEntryProto};
    use crate::onnx::tensor::from_tensor;

    fn model_with(init: TensorProto) -> ModelProto {
        ModelProto {
            ir_version: 8,
            graph: Some(GraphProto {
                name: "g".into(),
                initializer: vec![init],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn weights_are_slices_of_the_map() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::from_vec(&[1000], (0..1000).map(|i| i as f32).collect()).unwrap();
        let bytes = model_with(from_tensor(&w, "w").unwrap()).encode_to_vec();
        let path = write(dir.path(), "m.onnx", &bytes);
        let map = map_file(&path).unwrap();
        let range = map.as_ptr() as usize..map.as_ptr() as usize + map.len();
        let model = decode_model(map.clone(), "m").unwrap();
        let raw = &model.graph.as_ref().unwrap().initializer[0].raw_data;
        assert!(range.contains(&(raw.as_ptr() as usize)), "raw_data must point into the map");
        let (_, sha) = read_model(&path).unwrap();
        assert_eq!(sha, sha256_hex(&bytes));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn garbage_is_not_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::from_vec(&[64], vec![1.0f32; 64]).unwrap();
        let good = model_with(from_tensor(&w, "w").unwrap()).encode_to_vec();
        let truncated = write(dir.path(), "t.onnx", &good[..good.len() - 10]);
        let empty = write(dir.path(), "e.onnx", b"");
        // A deterministic pseudo-random byte soup.
        let mut x = 0x2545F4914F6CDD1Du64;
        let soup: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let random = write(dir.path(), "r.onnx", &soup);
        let text = write(dir.path(), "x.onnx", b"hello, this is not a protobuf at all\n");
        for p in [truncated, empty, random, text] {
            match read_model(&p) {
                Err(Error::InvalidModel(m)) => assert!(m.contains("not an ONNX model"), "{m}"),
                other => panic!("{}: expected InvalidModel, got {other:?}", p.display()),
            }
        }
        assert!(read_model(&dir.path().join("missing.onnx")).is_err());
    }

    fn external(location: &str, offset: Option<u64>, length: Option<u64>) -> TensorProto {
        let mut entries =
            vec![StringStringEntryProto { key: "location".into(), value: location.into() }];
        if let Some(o) = offset {
            entries.push(StringStringEntryProto { key: "offset".into(), value: o.to_string() });
        }
        if let Some(l) = length {
            entries.push(StringStringEntryProto { key: "length".into(), value: l.to_string() });
        }
        TensorProto {
            name: "w".into(),
            data_type: DType::F32.onnx_code(),
            dims: vec![2],
            data_location: DataLocation::External as i32,
            external_data: entries,
            ..Default::default()
        }
    }

    #[test]
    fn external_data_is_confined() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let mut data = vec![0u8; 4096];
        data.extend(1f32.to_le_bytes());
        data.extend(2f32.to_le_bytes());
        write(&dir, "w.bin", &data);
        write(&dir.join("sub"), "w.bin", &data);
        write(root.path(), "secret.bin", &data);
        let store = ExternalStore::new(&dir);

        let t = to_tensor(&external("w.bin", Some(4096), Some(8)), &store).unwrap();
        assert_eq!(t.view::<f32>().unwrap(), &[1.0, 2.0]);
        assert!(t.buffer().unwrap().is_borrowed(), "external data is mapped, not copied");
        let t = to_tensor(&external("sub/w.bin", Some(4096), None), &store).unwrap();
        assert_eq!(t.view::<f32>().unwrap(), &[1.0, 2.0]);
        assert!(to_tensor(&external("sub/../w.bin", Some(4096), None), &store).is_ok());

        let secret = root.path().join("secret.bin");
        for bad in ["../secret.bin", secret.to_str().unwrap(), "", "missing.bin", "sub"] {
            let e = to_tensor(&external(bad, Some(4096), Some(8)), &store);
            assert!(matches!(e, Err(Error::InvalidModel(_))), "{bad}: {e:?}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&secret, dir.join("link.bin")).unwrap();
            assert!(to_tensor(&external("link.bin", Some(4096), Some(8)), &store).is_err());
        }
        // Out of range, wrong length, and no folder at all.
        assert!(to_tensor(&external("w.bin", Some(4100), Some(8)), &store).is_err());
        assert!(to_tensor(&external("w.bin", Some(4092), None), &store).is_err());
        assert!(to_tensor(&external("w.bin", Some(u64::MAX), Some(8)), &store).is_err());
        assert!(to_tensor(&external("w.bin", Some(4096), Some(8)), &ExternalStore::none()).is_err());
    }

    #[test]
    fn value_files() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::from_vec(&[2], vec![1i64, 2]).unwrap();
        let p = write(dir.path(), "t.pb", &from_tensor(&t, "x").unwrap().encode_to_vec());
        assert!(
            matches!(read_value_file(&p).unwrap(), Value::Tensor(t) if t.to_i64_vec().unwrap() == [1, 2])
        );

        let seq = SequenceProto {
            elem_type: ValueKind::Tensor as i32,
            tensor_values: vec![from_tensor(&t, "").unwrap(), from_tensor(&t, "").unwrap()],
            ..Default::default()
        };
        let p = write(dir.path(), "s.pb", &seq.encode_to_vec());
        assert!(
            matches!(read_value_file(&p).unwrap(), Value::Sequence(DType::I64, v) if v.len() == 2)
        );

        let opt = OptionalProto {
            elem_type: ValueKind::Tensor as i32,
            tensor_value: Some(from_tensor(&t, "").unwrap()),
            ..Default::default()
        };
        let p = write(dir.path(), "o.pb", &opt.encode_to_vec());
        let ty = Type::Optional(Box::new(Type::Unknown));
        assert!(matches!(decode_value_file(&p, &ty).unwrap(), Value::Optional(Some(_))));

        let empty = OptionalProto::default();
        let p = write(dir.path(), "n.pb", &empty.encode_to_vec());
        assert!(matches!(read_value_file(&p).unwrap(), Value::Optional(None)));

        let empty_seq = SequenceProto { elem_type: 1, ..Default::default() };
        let p = write(dir.path(), "es.pb", &empty_seq.encode_to_vec());
        let ty = Type::Sequence(Box::new(Type::Tensor { dtype: Some(DType::I32), shape: None }));
        assert!(
            matches!(decode_value_file(&p, &ty).unwrap(), Value::Sequence(DType::I32, v) if v.is_empty())
        );
    }
}
