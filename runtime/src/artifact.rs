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
use crate::manifest::{Manifest, Metadata, Program, TensorData, FORMAT_VERSION};
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
    match t.blob {
        Some(b) => {
            let art = artifact
                .ok_or_else(|| Error::InvalidArtifact("blob reference outside an artifact".into()))?;
            let buf = art.blob(b)?;
            if buf.len() != n * dtype.size() {
                return Err(Error::InvalidArtifact(format!("blob {b} has the wrong length")));
            }
            if dtype == DType::Bool && buf.as_slice().iter().any(|&x| x > 1) {
                return Err(Error::InvalidArtifact("bool blob holds values other than 0/1".into()));
            }
            Tensor::from_buffer(dtype, &shape, buf)
        }
        None => Tensor::from_bytes(dtype, &shape, &t.inline),
    }
}
