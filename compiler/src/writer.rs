//! Writes a lowered model as a `.kiln` container (layout documented in kiln_runtime::artifact):
//! header, prost manifest, 64-byte aligned weight blobs, xxh3-64 checksum of everything before it.
//!
//! Writing to a path is atomic: the bytes go to a temporary file in the destination folder, which
//! is fsynced and renamed over the target; on any error the temporary file is removed, so a
//! partial artifact never appears. Blobs are streamed (not assembled in memory) and hashed on the
//! way out.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_runtime::artifact::{align_up, HEADER_LEN, MAGIC};
use kiln_runtime::manifest::{Blob, Manifest, FORMAT_VERSION};
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

/// Blob placement in the weight section: each blob 64-byte aligned, in order.
fn layout(lowered: &Lowered) -> Vec<Blob> {
    let mut end = 0usize;
    lowered
        .blobs
        .iter()
        .map(|t| {
            let offset = align_up(end);
            end = offset + t.bytes().len();
            Blob {
                offset: offset as u64,
                len: t.bytes().len() as u64,
            }
        })
        .collect()
}

/// Stream the container into `w`; returns the number of bytes written.
pub fn write_to(lowered: &Lowered, w: &mut dyn Write) -> Result<u64> {
    let blobs = layout(lowered);
    // The lowerer lays blobs out the same way; re-encode only if someone changed them since.
    let manifest_bytes =
        if lowered.manifest.blobs == blobs && lowered.manifest.format_version == FORMAT_VERSION {
            lowered.manifest.encode_to_vec()
        } else {
            let mut m: Manifest = lowered.manifest.clone();
            m.blobs = blobs.clone();
            m.format_version = FORMAT_VERSION;
            m.encode_to_vec()
        };
    for (i, t) in lowered.blobs.iter().enumerate() {
        if t.dtype() == kiln_runtime::DType::String {
            return Err(Error::Other(format!(
                "blob {i} is a string tensor (strings must be inline)"
            )));
        }
    }
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
    for (b, t) in blobs.iter().zip(&lowered.blobs) {
        hw.pad_to(weights_offset as u64 + b.offset)?;
        hw.write_all(t.bytes())?;
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
