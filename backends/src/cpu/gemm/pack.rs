//! Operand packing for the GEMM microkernels.
//!
//! B is cut into NR-wide column panels stored K-major (`panel[p·NR + j]`), zero-padded past N, so a
//! microkernel streams one contiguous KC×NR sliver per tile. A is cut per KC block into MR-row
//! panels, also K-major (`panel[p·MR + i]`), so each k step broadcasts MR consecutive floats.
//! `PackedB` holds a whole packed B (all of K) that can be built once and reused across calls, and
//! serialized into an artifact (`as_bytes` / `from_bytes`).

use kiln_runtime::{Error, Result};

use super::MatRef;
use crate::cpu::isa::Isa;

/// 64 bytes: the alignment of every packed buffer (one cache line, one AVX-512 vector).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
pub(crate) struct Line([f32; 16]);

/// A growable 64-byte aligned f32 buffer.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    lines: Vec<Line>,
}

impl AlignedBuf {
    /// At least `len` floats (contents unspecified but initialized).
    pub fn get(&mut self, len: usize) -> &mut [f32] {
        let lines = len.div_ceil(16);
        if self.lines.len() < lines {
            self.lines.resize(lines, Line::default());
        }
        // SAFETY: Line is 16 plain f32s with no padding.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f32, len) }
    }
}

/// Pack rows `pc..pc+kc` × columns `j0..j0+nc` of `b` into `ceil(nc/nr)` panels of `kc·nr` floats.
pub(crate) fn pack_b(dst: &mut [f32], b: MatRef, pc: usize, kc: usize, j0: usize, nc: usize, nr: usize) {
    for (pi, panel) in dst.chunks_exact_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
        let jb = j0 + pi * nr;
        let w = nr.min(j0 + nc - jb);
        pack_b_panel(panel, b, pc, jb, w, nr);
    }
}

/// One panel: `w ≤ nr` real columns starting at `jb`, the rest zero.
fn pack_b_panel(panel: &mut [f32], b: MatRef, pc: usize, jb: usize, w: usize, nr: usize) {
    if b.cs == 1 {
        for (p, out) in panel.chunks_exact_mut(nr).enumerate() {
            let off = (pc + p) * b.rs + jb;
            out[..w].copy_from_slice(&b.data[off..off + w]);
            out[w..].fill(0.0);
        }
    } else {
        for (p, out) in panel.chunks_exact_mut(nr).enumerate() {
            let off = (pc + p) * b.rs + jb * b.cs;
            for (j, o) in out[..w].iter_mut().enumerate() {
                *o = b.data[off + j * b.cs];
            }
            out[w..].fill(0.0);
        }
    }
}

/// Pack rows `i0..i0+mc` × columns `pc..pc+kc` of `a` into `ceil(mc/mr)` panels of `kc·mr` floats,
/// for the kernels of `isa`. Rows past `mc` in the last panel are unspecified: kernels read only
/// the rows they compute.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_a(dst: &mut [f32], a: MatRef, i0: usize, mc: usize, pc: usize, kc: usize, mr: usize, isa: Isa) {
    for (pi, panel) in dst.chunks_exact_mut(kc * mr).take(mc.div_ceil(mr)).enumerate() {
        let ib = i0 + pi * mr;
        let h = mr.min(i0 + mc - ib);
        #[cfg(target_arch = "x86_64")]
        if a.cs == 1 && isa == Isa::Avx512 && mr <= 16 && isa.supported() {
            let mut rows: [&[f32]; 16] = [&[]; 16];
            for (i, r) in rows.iter_mut().take(h).enumerate() {
                *r = &a.data[(ib + i) * a.rs + pc..][..kc];
            }
            // SAFETY: AVX-512F is available; every row holds kc floats and the panel kc·mr.
            unsafe { pack_a_panel_avx512(panel, &rows[..h], kc, mr) };
            continue;
        }
        let _ = isa;
        if a.rs == 1 {
            // Transposed A: each k step's rows are contiguous.
            for (p, out) in panel.chunks_exact_mut(mr).enumerate() {
                let off = (pc + p) * a.cs + ib;
                out[..h].copy_from_slice(&a.data[off..off + h]);
            }
        } else if a.cs == 1 {
            // k outer, rows inner: every store run is contiguous and each row is read in order
            // (rows inner-most on the write side was a scalar scatter with stride mr).
            let mut rows: [&[f32]; 16] = [&[]; 16];
            assert!(h <= rows.len(), "register tiles are at most 16 rows");
            for (i, r) in rows.iter_mut().take(h).enumerate() {
                *r = &a.data[(ib + i) * a.rs + pc..][..kc];
            }
            for (p, out) in panel.chunks_exact_mut(mr).enumerate() {
                for (o, r) in out.iter_mut().zip(&rows[..h]) {
                    *o = r[p];
                }
            }
        } else {
            for i in 0..h {
                let off = (ib + i) * a.rs + pc * a.cs;
                for p in 0..kc {
                    panel[p * mr + i] = a.data[off + p * a.cs];
                }
            }
        }
    }
}

/// One A panel from `rows` (at most 16, each `kc` floats) by 16×16 register transposes: 16 k
/// steps of every row are loaded as vectors, transposed, and each k step's `mr` floats stored
/// with one masked store. The scalar copy moved one float per load and store, and took ~7% of
/// MiniLM's batch-4 run (A is packed once per K block of every product).
///
/// # Safety
/// AVX-512F is available; `rows.len() ≤ mr ≤ 16`, every row holds `kc` floats, `panel` `kc·mr`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_panel_avx512(panel: &mut [f32], rows: &[&[f32]], kc: usize, mr: usize) {
    use std::arch::x86_64::*;
    debug_assert!(rows.len() <= mr && mr <= 16 && panel.len() >= kc * mr);
    let mask: __mmask16 = ((1u32 << mr) - 1) as __mmask16;
    let out = panel.as_mut_ptr();
    let mut p = 0;
    while p + 16 <= kc {
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, row) in rows.iter().enumerate() {
            r[i] = _mm512_loadu_ps(row.as_ptr().add(p));
        }
        let cols = transpose16x16(r);
        for (c, v) in cols.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add((p + c) * mr), mask, *v);
        }
        p += 16;
    }
    for p in p..kc {
        for (i, row) in rows.iter().enumerate() {
            *out.add(p * mr + i) = row[p];
        }
    }
}

/// The transpose of 16 vectors of 16 floats, `out[j][i] = r[i][j]`: within 128-bit lanes pairs of
/// rows interleaved, then quads (columns q, q+4, q+8, q+12 of rows 4j..4j+3 in u[4j+q]), then whole
/// lanes gathered across row quads.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16x16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for j in 0..4 {
        let pd = |v: __m512| _mm512_castps_pd(v);
        let (a0, a1, a2, a3) = (pd(t[4 * j]), pd(t[4 * j + 1]), pd(t[4 * j + 2]), pd(t[4 * j + 3]));
        u[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        u[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        u[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        u[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[q], u[4 + q]);
        let v1 = _mm512_shuffle_f32x4::<0xDD>(u[q], u[4 + q]);
        let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + q], u[12 + q]);
        let v3 = _mm512_shuffle_f32x4::<0xDD>(u[8 + q], u[12 + q]);
        out[q] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
        out[q + 8] = _mm512_shuffle_f32x4::<0xDD>(v0, v2);
        out[q + 4] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
        out[q + 12] = _mm512_shuffle_f32x4::<0xDD>(v1, v3);
    }
    out
}

const MAGIC: [u8; 8] = *b"KILNPKB1";

/// A B operand packed once for a given kernel family: `ceil(n/nr)` panels of `k·nr` floats.
///
/// Storage is one 64-byte aligned buffer whose first line is a header (magic, isa, nr, k, n), so
/// `as_bytes` is the serialized form without copying.
pub struct PackedB {
    buf: AlignedBuf,
    isa: Isa,
    nr: usize,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Pack the k×n matrix `b` for the kernels of `isa`.
    pub fn new(isa: Isa, b: MatRef, k: usize, n: usize) -> Result<PackedB> {
        if !b.fits(k, n) {
            return Err(Error::Other(format!("PackedB: operand too small for {k}x{n}")));
        }
        let nr = super::nr_for(isa);
        let mut p = PackedB::alloc(isa, nr, k, n);
        if k > 0 {
            pack_b(p.data_mut(), b, 0, k, 0, n, nr);
        }
        Ok(p)
    }

    /// Pack for the ISA kernels use now.
    pub fn for_active(b: MatRef, k: usize, n: usize) -> Result<PackedB> {
        PackedB::new(crate::cpu::isa::active(), b, k, n)
    }

    fn data_len(nr: usize, k: usize, n: usize) -> usize {
        n.div_ceil(nr) * k * nr
    }

    fn alloc(isa: Isa, nr: usize, k: usize, n: usize) -> PackedB {
        let mut buf = AlignedBuf::default();
        let len = 16 + PackedB::data_len(nr, k, n);
        buf.get(len).fill(0.0);
        let mut p = PackedB { buf, isa, nr, k, n };
        p.write_header();
        p
    }

    fn write_header(&mut self) {
        let mut h = [0u8; 64];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&self.isa.code().to_le_bytes());
        h[12..16].copy_from_slice(&(self.nr as u32).to_le_bytes());
        h[16..24].copy_from_slice(&(self.k as u64).to_le_bytes());
        h[24..32].copy_from_slice(&(self.n as u64).to_le_bytes());
        let line = &mut self.buf.lines[0].0;
        for (f, c) in line.iter_mut().zip(h.chunks_exact(4)) {
            *f = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
    pub fn nr(&self) -> usize {
        self.nr
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }

    /// The panels (after the header line).
    pub fn data(&self) -> &[f32] {
        let len = PackedB::data_len(self.nr, self.k, self.n);
        // SAFETY: the buffer holds 16 + len floats (alloc).
        unsafe { std::slice::from_raw_parts((self.buf.lines.as_ptr() as *const f32).add(16), len) }
    }

    fn data_mut(&mut self) -> &mut [f32] {
        let len = PackedB::data_len(self.nr, self.k, self.n);
        &mut self.buf.get(16 + len)[16..]
    }

    /// Serialized form: a 64-byte header then the panels as native-endian f32.
    pub fn as_bytes(&self) -> &[u8] {
        let floats = 16 + PackedB::data_len(self.nr, self.k, self.n);
        // SAFETY: plain floats viewed as bytes.
        unsafe { std::slice::from_raw_parts(self.buf.lines.as_ptr() as *const u8, floats * 4) }
    }

    /// Rebuild from `as_bytes` output, checking magic, ISA, panel width and size (a copy).
    pub fn from_bytes(bytes: &[u8]) -> Result<PackedB> {
        let (isa, nr, k, n) = parse_header(bytes)?;
        let mut p = PackedB::alloc(isa, nr, k, n);
        for (f, c) in p.data_mut().iter_mut().zip(bytes[64..].chunks_exact(4)) {
            *f = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(p)
    }

    /// A borrowed view (what the kernels read).
    pub fn view(&self) -> PackedView<'_> {
        PackedView { data: self.data(), isa: self.isa, nr: self.nr, k: self.k, n: self.n }
    }

    /// Element (p, j) of the original B (tests, relayout).
    pub fn get(&self, p: usize, j: usize) -> f32 {
        self.view().get(p, j)
    }

    /// The same B packed for another ISA's kernels.
    pub fn repack(&self, isa: Isa) -> PackedB {
        self.view().repack(isa)
    }
}

/// Check the header of serialized packed weights and their total size: (isa, nr, k, n).
fn parse_header(bytes: &[u8]) -> Result<(Isa, usize, usize, usize)> {
    let bad = |why: &str| Error::Other(format!("invalid packed GEMM weights: {why}"));
    if bytes.len() < 64 || bytes[..8] != MAGIC {
        return Err(bad("bad header"));
    }
    let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
    let isa = Isa::from_code(u32_at(8)).ok_or_else(|| bad("unknown ISA"))?;
    let nr = u32_at(12) as usize;
    if nr != super::nr_for(isa) {
        return Err(bad(&format!("panel width {nr} does not match the {isa} kernels")));
    }
    let k = usize::try_from(u64_at(16)).map_err(|_| bad("k too large"))?;
    let n = usize::try_from(u64_at(24)).map_err(|_| bad("n too large"))?;
    let len = n.checked_add(nr - 1).map(|v| v / nr).and_then(|p| p.checked_mul(k)).and_then(|v| v.checked_mul(nr));
    let len = len.ok_or_else(|| bad("size overflow"))?;
    if len.checked_add(16).and_then(|v| v.checked_mul(4)) != Some(bytes.len()) {
        return Err(bad(&format!("{} bytes for k={k} n={n} nr={nr}", bytes.len())));
    }
    Ok((isa, nr, k, n))
}

/// Packed B borrowed from elsewhere (a `PackedB`, or the bytes of an artifact constant, zero-copy).
#[derive(Clone, Copy)]
pub struct PackedView<'a> {
    data: &'a [f32],
    isa: Isa,
    nr: usize,
    k: usize,
    n: usize,
}

impl<'a> PackedView<'a> {
    /// View serialized packed weights in place: `Ok(None)` if the bytes are not 4-byte aligned
    /// (use `PackedB::from_bytes` to copy them then); an error if they are not valid.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Option<PackedView<'a>>> {
        let (isa, nr, k, n) = parse_header(bytes)?;
        if bytes.as_ptr() as usize % std::mem::align_of::<f32>() != 0 {
            return Ok(None);
        }
        let len = (bytes.len() - 64) / 4;
        // SAFETY: aligned for f32, length checked by parse_header, every bit pattern is an f32.
        let data = unsafe { std::slice::from_raw_parts(bytes.as_ptr().add(64) as *const f32, len) };
        Ok(Some(PackedView { data, isa, nr, k, n }))
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
    pub fn nr(&self) -> usize {
        self.nr
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }
    /// The panels.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// Element (p, j) of the original B.
    pub fn get(&self, p: usize, j: usize) -> f32 {
        self.data[(j / self.nr) * self.k * self.nr + p * self.nr + j % self.nr]
    }

    /// The same B packed for another ISA's kernels.
    pub fn repack(&self, isa: Isa) -> PackedB {
        let nr = super::nr_for(isa);
        let (k, n) = (self.k, self.n);
        let mut out = PackedB::alloc(isa, nr, k, n);
        let d = out.data_mut();
        for j in 0..n {
            for p in 0..k {
                d[(j / nr) * k * nr + p * nr + j % nr] = self.get(p, j);
            }
        }
        out
    }
}

impl std::fmt::Debug for PackedView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedView({} k={} n={} nr={})", self.isa, self.k, self.n, self.nr)
    }
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB({} k={} n={} nr={})", self.isa, self.k, self.n, self.nr)
    }
}
