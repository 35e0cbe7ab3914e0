//! Writes a lowered model as a `.kiln` container (layout documented in kiln_runtime::artifact):
//! header, prost manifest, 64-byte aligned weight blobs, xxh3-64 checksum of everything before it.
//!
//! Blobs whose bytes are mostly zero (pruned weights) are stored sparse-encoded when that is
//! smaller (`kiln_runtime::manifest::Sparse`: a bitmap plus the non-zero units); every constant
//! referring to such a blob is marked so the reader expands it at load.
//!
//! Writing to a path is atomic: the bytes go to a temporary file in the destination folder, which
//! is fsynced and renamed over the target; on any error the temporary file is removed, so a
//! partial artifact never appears. Blobs are streamed (not assembled in memory) and hashed on the
//! way out.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_runtime::artifact::{align_up, sparse_encode_best, HEADER_LEN, MAGIC};
use kiln_runtime::manifest::{Blob, Manifest, Program, Sparse, TensorData, FORMAT_VERSION};
use prost::Message;
use xxhash_rust::xxh3::Xxh3;

use crate::lower::Lowered;
use crate::{Error, Result};

/// Write the artifact to `path` atomically; returns its size in bytes.
pub fn write_artifact(lowered: &Lowered, path: &Path) -> Result<u64> {
    let tmp = TempFile::create(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, &tmp.file);
    let n = write_to(lowered, &mut w)?;
    w.flush()?;
    drop(w);
    tmp.file.sync_all()?;
    tmp.persist(path)?;
    Ok(n)
}

/// The artifact as bytes in memory.
pub fn to_bytes(lowered: &Lowered) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_to(lowered, &mut out)?;
    Ok(out)
}

/// Minimum bytes a sparse encoding must save before the writer prefers it over dense.
const SPARSE_MIN_SAVING: usize = 4096;

/// What goes into each blob: the tensor's dense bytes, or a sparse encoding of them.
fn encode_blobs(lowered: &Lowered) -> Vec<Option<(Sparse, Vec<u8>)>> {
    lowered
        .blobs
        .iter()
        .map(|t| {
            if t.dtype() == kiln_runtime::DType::String {
                return None;
            }
            sparse_encode_best(t.bytes(), t.dtype().size(), SPARSE_MIN_SAVING)
        })
        .collect()
}

/// Blob placement in the weight section: each blob 64-byte aligned, in order.
fn layout(lens: impl Iterator<Item = usize>) -> Vec<Blob> {
    let mut end = 0usize;
    lens.map(|len| {
        let offset = align_up(end);
        end = offset + len;
        Blob {
            offset: offset as u64,
            len: len as u64,
        }
    })
    .collect()
}

/// Mark every tensor of `p` (and its subgraphs) stored in a sparse blob.
fn mark_sparse(p: &mut Program, enc: &[Option<(Sparse, Vec<u8>)>]) {
    let mark = |t: &mut TensorData| {
        if let Some(Some((sp, _))) = t.blob.and_then(|b| enc.get(b as usize)) {
            t.sparse = Some(sp.clone());
        }
    };
    for c in &mut p.constants {
        if let Some(t) = c.tensor.as_mut() {
            mark(t);
        }
    }
    for s in &mut p.steps {
        for a in &mut s.attrs {
            a.t.iter_mut().chain(a.tensors.iter_mut()).for_each(mark);
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                mark_sparse(g, enc);
            }
        }
    }
}

/// Stream the container into `w`; returns the number of bytes written.
pub fn write_to(lowered: &Lowered, w: &mut dyn Write) -> Result<u64> {
    for (i, t) in lowered.blobs.iter().enumerate() {
        if t.dtype() == kiln_runtime::DType::String {
            return Err(Error::Other(format!(
                "blob {i} is a string tensor (strings must be inline)"
            )));
        }
    }
    let enc = encode_blobs(lowered);
    let data: Vec<&[u8]> = enc
        .iter()
        .zip(&lowered.blobs)
        .map(|(e, t)| e.as_ref().map_or(t.bytes(), |(_, b)| b.as_slice()))
        .collect();
    let blobs = layout(data.iter().map(|d| d.len()));
    let any_sparse = enc.iter().any(|e| e.is_some());
    // The lowerer lays blobs out the same way; re-encode only if someone changed them since.
    let manifest_bytes = if !any_sparse
        && lowered.manifest.blobs == blobs
        && lowered.manifest.format_version == FORMAT_VERSION
    {
        lowered.manifest.encode_to_vec()
    } else {
        let mut m: Manifest = lowered.manifest.clone();
        m.blobs = blobs.clone();
        m.format_version = FORMAT_VERSION;
        if let Some(p) = m.program.as_mut() {
            mark_sparse(p, &enc);
        }
        m.encode_to_vec()
    };
    let weights_offset = align_up(HEADER_LEN + manifest_bytes.len());
    let weights_len = blobs.last().map_or(0, |b| (b.offset + b.len) as usize);

    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(manifest_bytes.len() as u64).to_le_bytes());
    header[24..32].copy_from_slice(&(weights_offset as u64).to_le_bytes());
    header[32..40].copy_from_slice(&(weights_len as u64).to_le_bytes());

    let mut hw = HashingWriter {
        inner: w,
        hasher: Xxh3::new(),
        written: 0,
    };
    hw.write_all(&header)?;
    hw.write_all(&manifest_bytes)?;
    hw.pad_to(weights_offset as u64)?;
    for (b, d) in blobs.iter().zip(&data) {
        hw.pad_to(weights_offset as u64 + b.offset)?;
        hw.write_all(d)?;
    }
    let sum = hw.hasher.digest();
    let written = hw.written;
    w.write_all(&sum.to_le_bytes())?;
    Ok(written + 8)
}

/// Writes through while hashing and counting.
struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    hasher: Xxh3,
    written: u64,
}

impl HashingWriter<'_> {
    fn write_all(&mut self, b: &[u8]) -> Result<()> {
        self.inner.write_all(b)?;
        self.hasher.update(b);
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, pos: u64) -> Result<()> {
        const ZEROS: [u8; 64] = [0; 64];
        while self.written < pos {
            let n = (pos - self.written).min(64) as usize;
            self.write_all(&ZEROS[..n])?;
        }
        Ok(())
    }
}

/// A temporary file next to the destination, removed on drop unless persisted.
struct TempFile {
    file: File,
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn create(dest: &Path) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = dest
            .file_name()
            .ok_or_else(|| Error::Input(format!("{} is not a file path", dest.display())))?
            .to_string_lossy()
            .into_owned();
        for _ in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{base}.{}-{n}.tmp", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok(TempFile {
                        file,
                        path,
                        keep: false,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(Error::Input(format!(
                        "cannot create a file in {}: {e}",
                        dir.display()
                    )))
                }
            }
        }
        Err(Error::Other(format!(
            "cannot pick a temporary file name in {}",
            dir.display()
        )))
    }

    fn persist(mut self, dest: &Path) -> Result<()> {
        std::fs::rename(&self.path, dest).map_err(|e| {
            Error::Other(format!(
                "cannot move the artifact to {}: {e}",
                dest.display()
            ))
        })?;
        self.keep = true;
        // Make the rename itself durable (best effort: not every platform can sync a directory).
        if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{AttrValue, Attribute, Graph, Model, Node, Type};
    use crate::lower::lower;
    use kiln_runtime::{Artifact, DType, Tensor};

    fn weights(n: usize, keep_every: usize) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|i| if i % keep_every == 0 { i as f32 * 0.25 - 7.0 } else { 0.0 })
            .collect();
        Tensor::from_vec(&[n / 64, 64], v).unwrap()
    }

    /// f32 values none of whose bytes is zero (no sparse encoding can beat dense).
    fn no_zero_bytes(n: usize) -> Vec<f32> {
        (0..n as u32).map(|i| f32::from_bits(0x3f01_0101 | (i.wrapping_mul(2654435761) & 0x00fe_fefe))).collect()
    }

    fn node(op: &str, inputs: Vec<usize>, outputs: Vec<usize>, attrs: Vec<Attribute>) -> Node {
        let inputs = inputs.into_iter().map(Some).collect();
        let outputs = outputs.into_iter().map(Some).collect();
        Node { name: op.into(), op: op.into(), domain: String::new(), opset: 17, inputs, outputs, attrs }
    }

    /// x·W (W shared by a second MatMul) and an If whose branch holds another sparse constant.
    fn model(w: Tensor, inner: Tensor) -> Model {
        let mut g = Graph { name: "main".into(), ..Default::default() };
        let x = g.add_value("x", Type::tensor(DType::F32, vec![]));
        let c = g.add_value("c", Type::tensor(DType::Bool, vec![]));
        g.inputs = vec![x, c];
        let wv = g.add_const("W", w.clone());
        let w2 = g.add_const("W2", w);
        let (h, y, z) = (g.add_value("h", Type::Unknown), g.add_value("y", Type::Unknown), g.add_value("z", Type::Unknown));
        g.nodes.push(node("MatMul", vec![x, wv], vec![h], vec![]));
        g.nodes.push(node("MatMul", vec![h, w2], vec![y], vec![]));
        let mut branch = Graph { name: "b".into(), ..Default::default() };
        let k = branch.add_const("K", inner);
        branch.outputs = vec![k];
        let attrs = vec![
            Attribute { name: "then_branch".into(), value: AttrValue::Graph(Box::new(branch.clone())) },
            Attribute { name: "else_branch".into(), value: AttrValue::Graph(Box::new(branch)) },
        ];
        g.nodes.push(node("If", vec![c], vec![z], attrs));
        g.outputs = vec![y, z];
        Model { graph: g, opsets: vec![(String::new(), 17)], ..Default::default() }
    }

    fn constants(p: &Program) -> Vec<&TensorData> {
        p.constants.iter().filter_map(|c| c.tensor.as_ref()).collect()
    }

    #[test]
    fn sparse_blobs_round_trip_and_shrink_the_file() {
        let (w, inner) = (weights(64 * 256, 5), weights(64 * 128, 9));
        let sparse = to_bytes(&lower(&model(w.clone(), inner.clone()), "cpu-generic", &[]).unwrap()).unwrap();
        let dense_w = Tensor::from_vec(&[256, 64], no_zero_bytes(64 * 256)).unwrap();
        let dense = to_bytes(&lower(&model(dense_w, inner.clone()), "cpu-generic", &[]).unwrap()).unwrap();
        // 64 KiB of weights at 20% density: bitmap (2 KiB) + 13 KiB of values instead of 64 KiB.
        assert!(sparse.len() + 45_000 < dense.len(), "{} vs {}", sparse.len(), dense.len());

        let art = Artifact::from_vec(sparse).unwrap();
        let main = art.program();
        let consts = constants(main);
        assert_eq!(consts.len(), 2);
        for t in consts {
            assert_eq!(t.sparse.as_ref().map(|s| s.unit), Some(4));
            assert_eq!(art.tensor(t).unwrap().view::<f32>().unwrap(), w.view::<f32>().unwrap());
        }
        let branch = main.steps[2].attrs[0].g.as_ref().unwrap();
        let k = constants(branch)[0];
        assert!(k.sparse.is_some());
        assert_eq!(art.tensor(k).unwrap().view::<f32>().unwrap(), inner.view::<f32>().unwrap());
    }

    #[test]
    fn dense_blobs_stay_dense() {
        let w = Tensor::from_vec(&[64, 64], no_zero_bytes(4096)).unwrap();
        let lowered = lower(&model(w.clone(), weights(64 * 128, 9)), "cpu-generic", &[]).unwrap();
        let art = Artifact::from_vec(to_bytes(&lowered).unwrap()).unwrap();
        let t = constants(art.program())[0];
        assert_eq!(t.sparse, None);
        assert_eq!(art.tensor(t).unwrap().view::<f32>().unwrap(), w.view::<f32>().unwrap());
    }

    #[test]
    fn a_corrupted_sparse_header_is_an_invalid_artifact() {
        let mut lowered = lower(&model(weights(64 * 256, 5), weights(64 * 128, 9)), "cpu-generic", &[]).unwrap();
        // Claim a sparse encoding for a blob that is not one; the checksum is still valid.
        let p = lowered.manifest.program.as_mut().unwrap();
        let bytes_blob = Tensor::from_vec(&[4096], vec![7u8; 4096]).unwrap();
        lowered.blobs[0] = bytes_blob;
        for c in &mut p.constants {
            if let Some(t) = c.tensor.as_mut() {
                t.sparse = Some(Sparse { unit: 4, nnz: 3 });
            }
        }
        let art = Artifact::from_vec(to_bytes(&lowered).unwrap()).unwrap();
        let t = constants(art.program())[0];
        assert!(matches!(art.tensor(t), Err(kiln_runtime::Error::InvalidArtifact(_))));
    }
}
