//! The `.kiln` container and its zero-copy reader.
//!
//! Layout (all integers little-endian):
//! ```text
//! 0   magic  "KILNART\0"
//! 8   u32    format version (manifest::FORMAT_VERSION)
//! 12  u32    flags (0)
//! 16  u64    manifest length M
//! 24  u64    weight section offset W (multiple of 64)
//! 32  u64    weight section length L
//! 40  ..64   zero
//! 64  M bytes prost-encoded Manifest
//! W   L bytes of weights; every blob starts 64-byte aligned
//! W+L u64    xxh3-64 of every byte before it
//! ```
//! The reader checks magic, version, every bound and the checksum before anything runs, so a
//! truncated or corrupted file is refused with an error instead of misbehaving later.

use std::path::Path;
use std::sync::Arc;

use prost::Message;

use crate::error::{Error, Result};
use crate::manifest::{Manifest, Metadata, Program, Sparse, TensorData, FORMAT_VERSION};
use crate::tensor::{Buffer, Bytes, Tensor, ALIGN};
use crate::DType;

pub const MAGIC: &[u8; 8] = b"KILNART\0";
pub const HEADER_LEN: usize = 64;
pub const CHECKSUM_LEN: usize = 8;

/// Round `n` up to the artifact alignment.
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A validated artifact: its bytes (borrowed, mapped or owned) and decoded manifest.
pub struct Artifact {
    bytes: Arc<Bytes>,
    weights_offset: usize,
    weights_len: usize,
    manifest: Manifest,
}

/// Wrapper that gives `include_bytes!` data the 64-byte alignment artifacts need.
#[repr(C, align(64))]
pub struct Aligned<T: ?Sized>(pub T);

/// Embed a `.kiln` file in the binary with the alignment the zero-copy reader needs:
/// `static MODEL: &[u8] = kiln_runtime::include_artifact!("model.kiln");`
#[macro_export]
macro_rules! include_artifact {
    ($path:expr) => {{
        static ALIGNED: &$crate::artifact::Aligned<[u8]> =
            &$crate::artifact::Aligned(*include_bytes!($path));
        &ALIGNED.0
    }};
}

impl Artifact {
    /// Read from bytes embedded in the program (must start 64-byte aligned; see `include_artifact!`).
    pub fn from_static(bytes: &'static [u8]) -> Result<Artifact> {
        Artifact::parse(Arc::new(Bytes::Static(bytes)))
    }

    /// Memory-map a file; weights are used in place.
    pub fn open(path: impl AsRef<Path>) -> Result<Artifact> {
        let path = path.as_ref();
        let file = std::fs::File::open(path)
            .map_err(|e| Error::Input(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: the map is read-only; a concurrent truncation of the file by another process is
        // outside what any mmap-based reader can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::Input(format!("cannot map {}: {e}", path.display())))?;
        Artifact::parse(Arc::new(Bytes::Shared(Arc::new(map))))
    }

    /// Read from owned bytes (copied once into an aligned buffer if they are not aligned).
    pub fn from_vec(bytes: Vec<u8>) -> Result<Artifact> {
        if bytes.as_ptr() as usize % ALIGN == 0 {
            Artifact::parse(Arc::new(Bytes::Shared(Arc::new(bytes))))
        } else {
            Artifact::parse(Arc::new(Bytes::Heap(crate::tensor::AlignedBuf::from_bytes(&bytes))))
        }
    }

    fn parse(bytes: Arc<Bytes>) -> Result<Artifact> {
        let data: &[u8] = match &*bytes {
            Bytes::Heap(b) => b.as_slice(),
            Bytes::Static(s) => s,
            Bytes::Shared(s) => (**s).as_ref(),
        };
        let bad = |m: &str| Error::InvalidArtifact(m.to_string());
        if data.len() < 8 || &data[..8] != MAGIC {
            return Err(bad("not a kiln artifact (wrong magic bytes)"));
        }
        if data.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(bad("file is truncated (shorter than the header)"));
        }
        if data.as_ptr() as usize % ALIGN != 0 {
            return Err(bad("artifact bytes are not 64-byte aligned (use include_artifact!)"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(Error::Version { found: version, supported: FORMAT_VERSION });
        }
        let manifest_len = u64_at(16) as usize;
        let weights_offset = u64_at(24) as usize;
        let weights_len = u64_at(32) as usize;
        let end = weights_offset
            .checked_add(weights_len)
            .and_then(|e| e.checked_add(CHECKSUM_LEN))
            .ok_or_else(|| bad("header sizes overflow"))?;
        if HEADER_LEN.checked_add(manifest_len).is_none_or(|m| m > weights_offset)
            || weights_offset % ALIGN != 0
        {
            return Err(bad("header describes overlapping or misaligned sections"));
        }
        if end != data.len() {
            return Err(bad(&format!(
                "file is {} bytes but its header describes {end} (truncated or padded)",
                data.len()
            )));
        }
        let stored = u64::from_le_bytes(data[end - CHECKSUM_LEN..].try_into().unwrap());
        let actual = xxhash_rust::xxh3::xxh3_64(&data[..end - CHECKSUM_LEN]);
        if stored != actual {
            return Err(bad("checksum mismatch (the file is corrupted)"));
        }
        let manifest = Manifest::decode(&data[HEADER_LEN..HEADER_LEN + manifest_len])
            .map_err(|e| bad(&format!("manifest does not decode: {e}")))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(Error::Version { found: manifest.format_version, supported: FORMAT_VERSION });
        }
        for (i, b) in manifest.blobs.iter().enumerate() {
            let (o, l) = (b.offset as usize, b.len as usize);
            if o % ALIGN != 0 || o.checked_add(l).is_none_or(|e| e > weights_len) {
                return Err(bad(&format!("blob {i} is misaligned or out of bounds")));
            }
        }
        if manifest.program.is_none() {
            return Err(bad("manifest has no program"));
        }
        let art = Artifact { bytes, weights_offset, weights_len, manifest };
        art.check_program(art.program(), 0)?;
        Ok(art)
    }

    /// Structural checks so that a backend can index values without bounds panics.
    fn check_program(&self, p: &Program, depth: usize) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArtifact(m));
        if depth > 64 {
            return bad("subgraphs nested too deeply".into());
        }
        let n = p.values.len() as i64;
        let ok = |id: i64| id >= -1 && id < n;
        if p.inputs.iter().chain(&p.outputs).any(|&v| !ok(v as i64)) {
            return bad("program input/output refers to a missing value".into());
        }
        for c in &p.constants {
            if !ok(c.value as i64) {
                return bad("constant bound to a missing value".into());
            }
            if let Some(t) = &c.tensor {
                self.check_tensor(t)?;
            }
        }
        for c in &p.captures {
            if !ok(c.inner as i64) {
                return bad("capture bound to a missing value".into());
            }
        }
        for s in &p.steps {
            if s.inputs.iter().chain(&s.outputs).any(|&v| !ok(v as i64)) {
                return bad(format!("step '{}' ({}) refers to a missing value", s.name, s.op));
            }
            for a in &s.attrs {
                for g in a.g.iter().chain(&a.graphs) {
                    self.check_program(g, depth + 1)?;
                }
                for t in a.t.iter().chain(&a.tensors) {
                    self.check_tensor(t)?;
                }
            }
        }
        Ok(())
    }

    fn check_tensor(&self, t: &TensorData) -> Result<()> {
        if let Some(b) = t.blob {
            if b as usize >= self.manifest.blobs.len() {
                return Err(Error::InvalidArtifact(format!("tensor refers to missing blob {b}")));
            }
        }
        Ok(())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn program(&self) -> &Program {
        self.manifest.program.as_ref().expect("checked at parse")
    }

    pub fn metadata(&self) -> Metadata {
        self.manifest.metadata.clone().unwrap_or_default()
    }

    /// Total bytes of the weight section.
    pub fn weights_len(&self) -> usize {
        self.weights_len
    }

    /// Materialise constant data as a tensor; blob data is borrowed, not copied.
    pub fn tensor(&self, t: &TensorData) -> Result<Tensor> {
        tensor_from_data(t, Some(self))
    }

    pub(crate) fn blob(&self, index: u32) -> Result<Buffer> {
        let b = self
            .manifest
            .blobs
            .get(index as usize)
            .ok_or_else(|| Error::InvalidArtifact(format!("missing blob {index}")))?;
        Buffer::window(self.bytes.clone(), self.weights_offset + b.offset as usize, b.len as usize)
    }
}

/// Build a tensor from manifest `TensorData`; blob references need the artifact, inline data not.
pub fn tensor_from_data(t: &TensorData, artifact: Option<&Artifact>) -> Result<Tensor> {
    let dtype = DType::from_onnx(t.dtype)
        .ok_or_else(|| Error::InvalidArtifact(format!("unknown dtype {}", t.dtype)))?;
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let n = n.ok_or_else(|| Error::InvalidArtifact("tensor size overflows".into()))?;
    if dtype == DType::String {
        let strings = t
            .strings
            .iter()
            .map(|s| String::from_utf8(s.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::InvalidArtifact("string constant is not UTF-8".into()))?;
        return Tensor::from_strings(&shape, strings);
    }
    if let Some(sp) = &t.sparse {
        let dense_len = n
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::InvalidArtifact("tensor size overflows".into()))?;
        let buf = match t.blob {
            Some(b) => sparse_decode(sp, blob_of(artifact, b)?.as_slice(), dense_len)?,
            None => sparse_decode(sp, &t.inline, dense_len)?,
        };
        check_bool(dtype, buf.as_slice())?;
        return Tensor::from_buffer(dtype, &shape, buf);
    }
    match t.blob {
        Some(b) => {
            let buf = blob_of(artifact, b)?;
            if buf.len() != n * dtype.size() {
                return Err(Error::InvalidArtifact(format!("blob {b} has the wrong length")));
            }
            check_bool(dtype, buf.as_slice())?;
            Tensor::from_buffer(dtype, &shape, buf)
        }
        None => Tensor::from_bytes(dtype, &shape, &t.inline),
    }
}

fn blob_of(artifact: Option<&Artifact>, b: u32) -> Result<Buffer> {
    artifact
        .ok_or_else(|| Error::InvalidArtifact("blob reference outside an artifact".into()))?
        .blob(b)
}

fn check_bool(dtype: DType, bytes: &[u8]) -> Result<()> {
    if dtype == DType::Bool && bytes.iter().any(|&x| x > 1) {
        return Err(Error::InvalidArtifact("bool constant holds values other than 0/1".into()));
    }
    Ok(())
}

/// Units the sparse encoding may use (bytes per unit).
pub const SPARSE_UNITS: [u32; 4] = [1, 2, 4, 8];

/// Sparse-encode `dense` in units of `unit` bytes (layout in `manifest::Sparse`).
/// `unit` must be one of `SPARSE_UNITS` and divide `dense.len()`.
pub fn sparse_encode(dense: &[u8], unit: usize) -> Result<(Sparse, Vec<u8>)> {
    if !SPARSE_UNITS.contains(&(unit as u32)) || dense.len() % unit != 0 {
        return Err(Error::Other(format!("sparse unit {unit} for {} bytes", dense.len())));
    }
    let units = dense.len() / unit;
    let mut out = vec![0u8; units.div_ceil(8)];
    let mut nnz = 0u64;
    for (i, u) in dense.chunks_exact(unit).enumerate() {
        if u.iter().any(|&b| b != 0) {
            out[i / 8] |= 1 << (i % 8);
            out.extend_from_slice(u);
            nnz += 1;
        }
    }
    Ok((Sparse { unit: unit as u32, nnz }, out))
}

/// Bytes a sparse encoding of `dense` in units of `unit` would take (without building it).
pub fn sparse_size(dense: &[u8], unit: usize) -> usize {
    let nnz = dense.chunks_exact(unit).filter(|u| u.iter().any(|&b| b != 0)).count();
    (dense.len() / unit).div_ceil(8) + nnz * unit
}

/// The smallest sparse encoding of `dense` (elements of `elem_size` bytes) if it saves at least
/// `min_saving` bytes over dense. Units are at least an element: zero bytes inside non-zero
/// elements are not what the encoding is for.
pub fn sparse_encode_best(dense: &[u8], elem_size: usize, min_saving: usize) -> Option<(Sparse, Vec<u8>)> {
    let (unit, size) = SPARSE_UNITS
        .iter()
        .map(|&u| u as usize)
        .filter(|&u| u >= elem_size && dense.len() % u == 0)
        .map(|u| (u, sparse_size(dense, u)))
        .min_by_key(|&(_, s)| s)?;
    if size.saturating_add(min_saving) > dense.len() {
        return None;
    }
    sparse_encode(dense, unit).ok()
}

/// Expand sparse-encoded `stored` bytes into `dense_len` dense bytes in a fresh aligned buffer,
/// validating every length and count first (corrupted data is an error, never a panic).
pub fn sparse_decode(sp: &Sparse, stored: &[u8], dense_len: usize) -> Result<Buffer> {
    let bad = |m: String| Error::InvalidArtifact(format!("sparse constant: {m}"));
    let unit = sp.unit as usize;
    if !SPARSE_UNITS.contains(&sp.unit) {
        return Err(bad(format!("unit {unit} is not 1, 2, 4 or 8")));
    }
    if dense_len % unit != 0 {
        return Err(bad(format!("{dense_len} dense bytes are not a whole number of {unit}-byte units")));
    }
    let units = dense_len / unit;
    let map_len = units.div_ceil(8);
    let want = usize::try_from(sp.nnz)
        .ok()
        .filter(|&k| k <= units)
        .and_then(|k| k.checked_mul(unit))
        .and_then(|v| v.checked_add(map_len))
        .ok_or_else(|| bad(format!("{} non-zero units of {units}", sp.nnz)))?;
    if stored.len() != want {
        return Err(bad(format!("{} stored bytes, the header implies {want}", stored.len())));
    }
    let (map, values) = stored.split_at(map_len);
    let set: u64 = map.iter().map(|b| b.count_ones() as u64).sum();
    if set != sp.nnz {
        return Err(bad(format!("bitmap has {set} set bits, header says {}", sp.nnz)));
    }
    if units % 8 != 0 && map.last().is_some_and(|&b| b >> (units % 8) != 0) {
        return Err(bad("bitmap has bits set past the last unit".into()));
    }
    let mut buf = Buffer::zeroed(dense_len);
    let out = buf.make_mut();
    let mut src = values.chunks_exact(unit);
    for (bi, &byte) in map.iter().enumerate() {
        let mut bits = byte;
        while bits != 0 {
            let i = bi * 8 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            // Counts were checked above, so the values cannot run out.
            let v = src.next().ok_or_else(|| bad("values run out".into()))?;
            out[i * unit..(i + 1) * unit].copy_from_slice(v);
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Mostly-zero f32 weights with a few non-zeros (including -0.0, whose bytes are not zero).
    fn pruned(n: usize) -> Vec<f32> {
        (0..n).map(|i| if i % 7 == 3 { i as f32 - 50.0 } else if i == 5 { -0.0 } else { 0.0 }).collect()
    }

    #[test]
    fn sparse_round_trips_every_unit_and_length() {
        for n in [0usize, 1, 7, 8, 9, 64, 1000] {
            let dense = f32_bytes(&pruned(n));
            for unit in SPARSE_UNITS {
                let unit = unit as usize;
                if dense.len() % unit != 0 {
                    assert!(sparse_encode(&dense, unit).is_err());
                    continue;
                }
                let (sp, enc) = sparse_encode(&dense, unit).unwrap();
                assert_eq!(enc.len(), sparse_size(&dense, unit));
                let back = sparse_decode(&sp, &enc, dense.len()).unwrap();
                assert_eq!(back.as_slice(), &dense[..], "n {n} unit {unit}");
            }
        }
    }

    #[test]
    fn sparse_encoding_is_only_chosen_when_smaller() {
        let dense = f32_bytes(&pruned(4096));
        let (sp, enc) = sparse_encode_best(&dense, 4, 64).unwrap();
        assert_eq!(sp.unit, 4);
        assert!(enc.len() < dense.len() / 4);
        // Dense values without a zero byte anywhere: no encoding beats dense.
        let halves: Vec<f32> = (0..4096).map(|i| i as f32 * 0.5 + 1.0).collect();
        assert!(sparse_encode_best(&f32_bytes(&halves), 4, 0).is_none(), "zero bytes inside elements");
        assert!(sparse_encode_best(&f32_bytes(&halves), 1, 0).is_some());
        let full: Vec<f32> = (0..4096u32).map(|i| f32::from_bits(0x3f01_0101 | (i.wrapping_mul(2654435761) & 0x00fe_fefe))).collect();
        assert!(sparse_encode_best(&f32_bytes(&full), 4, 0).is_none());
    }

    #[test]
    fn tensor_from_inline_sparse_data() {
        let v = pruned(100);
        let (sp, enc) = sparse_encode(&f32_bytes(&v), 4).unwrap();
        let t = TensorData { dtype: 1, dims: vec![10, 10], inline: enc, sparse: Some(sp), ..Default::default() };
        let got = tensor_from_data(&t, None).unwrap();
        assert_eq!(got.shape(), &[10, 10]);
        assert_eq!(got.view::<f32>().unwrap(), &v[..]);
        assert_eq!(got.bytes().as_ptr() as usize % ALIGN, 0);
    }

    #[test]
    fn corrupted_sparse_data_is_refused_not_panicking() {
        let dense = f32_bytes(&pruned(100));
        let (sp, enc) = sparse_encode(&dense, 4).unwrap();
        let is_invalid = |r: Result<Buffer>| matches!(r, Err(Error::InvalidArtifact(_)));
        // Wrong counts, lengths and units.
        for nnz in [0, sp.nnz - 1, sp.nnz + 1, u64::MAX, u64::MAX / 4] {
            assert!(is_invalid(sparse_decode(&Sparse { nnz, ..sp.clone() }, &enc, dense.len())));
        }
        for unit in [0, 3, 16, u32::MAX] {
            assert!(is_invalid(sparse_decode(&Sparse { unit, ..sp.clone() }, &enc, dense.len())));
        }
        assert!(is_invalid(sparse_decode(&sp, &enc[..enc.len() - 1], dense.len())));
        assert!(is_invalid(sparse_decode(&sp, &[enc.clone(), vec![0]].concat(), dense.len())));
        // Dense lengths whose bitmap is longer or shorter than the stored one.
        assert!(is_invalid(sparse_decode(&sp, &enc, dense.len() + 32)));
        assert!(is_invalid(sparse_decode(&sp, &enc, dense.len() - 32)));
        assert!(is_invalid(sparse_decode(&Sparse { unit: 8, nnz: 1 }, &[0u8; 9], 12)));
        // A bit moved from one unit to another keeps the count but not the data: still decodes.
        // A bit set past the last unit does not.
        let (sp, mut enc) = sparse_encode(&f32_bytes(&[1.0, 0.0, 0.0]), 4).unwrap();
        enc[0] = 0b1000;
        assert!(is_invalid(sparse_decode(&sp, &enc, 12)));
        // Every single-byte corruption either decodes to some buffer or is refused; never panics.
        let (sp, enc) = sparse_encode(&f32_bytes(&pruned(50)), 4).unwrap();
        for i in 0..enc.len() {
            for x in [0u8, 1, 0x80, 0xff] {
                let mut e = enc.clone();
                e[i] = x;
                let _ = sparse_decode(&sp, &e, 200);
            }
        }
        // Through tensor_from_data too (dense length from dtype and dims).
        let t = TensorData { dtype: 1, dims: vec![3, 3], inline: enc, sparse: Some(sp), ..Default::default() };
        assert!(matches!(tensor_from_data(&t, None), Err(Error::InvalidArtifact(_))));
    }

    #[test]
    fn sparse_bool_constants_are_validated() {
        let (sp, enc) = sparse_encode(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0], 1).unwrap();
        let t = TensorData { dtype: 9, dims: vec![10], inline: enc, sparse: Some(sp), ..Default::default() };
        assert!(matches!(tensor_from_data(&t, None), Err(Error::InvalidArtifact(_))));
    }

    /// `TensorData` as it was before the `sparse` field existed (field numbers 1-5).
    #[derive(Clone, PartialEq, prost::Message)]
    struct OldTensorData {
        #[prost(int32, tag = "1")]
        dtype: i32,
        #[prost(uint64, repeated, tag = "2")]
        dims: Vec<u64>,
        #[prost(uint32, optional, tag = "3")]
        blob: Option<u32>,
        #[prost(bytes = "vec", tag = "4")]
        inline: Vec<u8>,
        #[prost(bytes = "vec", repeated, tag = "5")]
        strings: Vec<Vec<u8>>,
    }

    #[test]
    fn old_tensor_data_still_reads_as_dense() {
        let v: Vec<f32> = vec![0.0, 1.5, 0.0, -2.0];
        let old = OldTensorData { dtype: 1, dims: vec![2, 2], inline: f32_bytes(&v), ..Default::default() };
        let t = TensorData::decode(old.encode_to_vec().as_slice()).unwrap();
        assert_eq!(t.sparse, None);
        assert_eq!(tensor_from_data(&t, None).unwrap().view::<f32>().unwrap(), &v[..]);
        // And dense data written now encodes exactly as before (the new field is absent).
        let new = TensorData { dtype: 1, dims: vec![2, 2], inline: f32_bytes(&v), ..Default::default() };
        assert_eq!(new.encode_to_vec(), old.encode_to_vec());
    }
}
