//! The runtime tensor: dtype + shape + a shared, 64-byte-aligned byte buffer (or a string list).
//!
//! Buffers are reference counted so constants borrowed from an artifact (static bytes or a memory map)
//! and intermediate results share one type; cloning a tensor never copies its data. Mutable access
//! copies on write only when the buffer is shared, which lets kernels work in place on dead inputs.

use std::alloc::{self, Layout};
use std::fmt;
use std::sync::Arc;

use crate::dtype::{DType, Elem};
use crate::error::{Error, Result};

/// Alignment of every heap buffer and every weight blob in an artifact.
pub const ALIGN: usize = 64;

/// Owned, initialised, 64-byte-aligned bytes. Heap blocks come from (and return to) the process
/// buffer pool, so intermediates of repeated runs reuse memory instead of page-faulting fresh
/// allocations in; every block is zero-filled when first allocated, so its bytes are always
/// initialised (stale data from an earlier tensor at worst, never uninitialised memory).
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    /// Size of the block behind `ptr` (its pool size class); 0 for the empty buffer.
    cap: usize,
}

unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let (mut b, fresh) = AlignedBuf::block(len);
        if !fresh {
            b.as_mut_slice().fill(0);
        }
        b
    }

    /// `len` bytes with unspecified (but initialised) contents: for outputs the caller overwrites
    /// completely. Skips the zero fill of `zeroed`.
    pub fn recycled(len: usize) -> AlignedBuf {
        AlignedBuf::block(len).0
    }

    /// A block for `len` bytes: from the pool if one of the size class is free, else freshly
    /// allocated and zeroed (the bool says which).
    fn block(len: usize) -> (AlignedBuf, bool) {
        if len == 0 {
            return (AlignedBuf { ptr: ALIGN as *mut u8, len: 0, cap: 0 }, true);
        }
        let cap = pool::class(len);
        if let Some((ptr, cap)) = pool::take(cap) {
            return (AlignedBuf { ptr, len, cap }, false);
        }
        let ptr = match huge::alloc(cap) {
            Some(ptr) => ptr,
            None => {
                let layout = Layout::from_size_align(cap, ALIGN).expect("buffer size overflows");
                // SAFETY: layout has non-zero size.
                let ptr = unsafe { alloc::alloc_zeroed(layout) };
                if ptr.is_null() {
                    alloc::handle_alloc_error(layout);
                }
                ptr
            }
        };
        (AlignedBuf { ptr, len, cap }, true)
    }

    pub fn from_bytes(bytes: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::recycled(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid and initialised for len bytes (or dangling+aligned with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap > 0 {
            pool::put(self.ptr, self.cap);
        }
    }
}

/// Large blocks as their own anonymous mappings advised as transparent huge pages (Linux): the
/// first run of a model with big activations (PP-OCR det: 10 MB tensors) then faults its buffers
/// in 2 MiB at a time instead of 4 KiB. Fresh mappings are zero, as `block` requires.
#[cfg(target_os = "linux")]
mod huge {
    /// Blocks of at least this many bytes are mapped.
    const MIN: usize = 4 << 20;
    const PAGE: usize = 2 << 20;

    pub(super) fn alloc(cap: usize) -> Option<*mut u8> {
        if cap < MIN {
            return None;
        }
        // Map one huge page more than needed and trim both ends so the block is 2 MiB aligned.
        let len = cap.next_multiple_of(PAGE);
        // SAFETY: an anonymous private mapping; every argument is valid.
        let raw = unsafe {
            libc::mmap(std::ptr::null_mut(), len + PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if raw == libc::MAP_FAILED {
            // Out of memory, as for the allocator (`free` relies on every such block being mapped).
            std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(cap, PAGE).expect("valid layout"));
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(PAGE);
        // SAFETY: both trims lie inside the mapping just made; the advice is only a hint.
        unsafe {
            if aligned > start {
                libc::munmap(raw, aligned - start);
            }
            let tail = start + len + PAGE - (aligned + len);
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Some(aligned as *mut u8)
    }

    /// Unmap a block made by `alloc`; false if `cap` says it came from the allocator.
    pub(super) fn free(ptr: *mut u8, cap: usize) -> bool {
        if cap < MIN {
            return false;
        }
        // SAFETY: blocks of this size class were mapped by `alloc` with this length.
        unsafe { libc::munmap(ptr as *mut libc::c_void, cap.next_multiple_of(PAGE)) };
        true
    }
}

#[cfg(not(target_os = "linux"))]
mod huge {
    pub(super) fn alloc(_cap: usize) -> Option<*mut u8> {
        None
    }

    pub(super) fn free(_ptr: *mut u8, _cap: usize) -> bool {
        false
    }
}

/// The process-wide pool of freed heap blocks, by size class, bounded in total size
/// (`KILN_POOL_MB`, default 512; 0 disables pooling). Thread-safe; a block is reused only for a
/// request of its own size class, so reuse never hands out a block smaller than asked for.
mod pool {
    use std::alloc::{self, Layout};
    use std::collections::BTreeMap;
    use std::sync::{Mutex, OnceLock};

    use super::ALIGN;

    struct Pool {
        /// Free blocks (addresses) by size class.
        free: BTreeMap<usize, Vec<usize>>,
        /// Total bytes in `free`.
        bytes: usize,
    }

    static POOL: Mutex<Pool> = Mutex::new(Pool { free: BTreeMap::new(), bytes: 0 });

    /// Blocks larger than this go straight back to the allocator (one-off huge buffers such as a
    /// whole artifact should not pin memory).
    const MAX_BLOCK: usize = 256 << 20;

    fn limit() -> usize {
        static LIMIT: OnceLock<usize> = OnceLock::new();
        *LIMIT.get_or_init(|| {
            std::env::var("KILN_POOL_MB")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(512)
                .saturating_mul(1 << 20)
        })
    }

    /// The block size serving a request of `len` (> 0) bytes: a multiple of 64 up to 1 KiB, then
    /// eight classes per power of two (at most 12.5% slack).
    pub(super) fn class(len: usize) -> usize {
        if len <= 1024 {
            return len.next_multiple_of(ALIGN);
        }
        let msb = usize::BITS - 1 - len.leading_zeros();
        len.next_multiple_of(1 << (msb - 3))
    }

    /// Requests of at least this many bytes may take a free block of a larger class.
    const BORROW_MIN: usize = 64 << 10;

    /// A free block for a request of class `cap`, and the block's own class: one of exactly that
    /// class, else (for large requests) the smallest free block of at most twice the size. The
    /// classes a model's run asks for vary from step to step; without borrowing, every new class
    /// met a miss and mapped fresh memory, so the first run of PP-OCR det touched ~90 MB (to be
    /// zeroed by the kernel) for 23 MB of live tensors.
    pub(super) fn take(cap: usize) -> Option<(*mut u8, usize)> {
        let mut p = POOL.lock().ok()?;
        let class = match p.free.get(&cap).is_some_and(|v| !v.is_empty()) {
            true => cap,
            false if cap >= BORROW_MIN => *p.free.range(cap + 1..=2 * cap).find(|(_, v)| !v.is_empty())?.0,
            false => return None,
        };
        let ptr = p.free.get_mut(&class)?.pop()?;
        p.bytes -= class;
        Some((ptr as *mut u8, class))
    }

    pub(super) fn put(ptr: *mut u8, cap: usize) {
        if cap <= MAX_BLOCK {
            if let Ok(mut p) = POOL.lock() {
                if p.bytes + cap <= limit() {
                    p.bytes += cap;
                    p.free.entry(cap).or_default().push(ptr as usize);
                    return;
                }
            }
        }
        if super::huge::free(ptr, cap) {
            return;
        }
        // SAFETY: the block was allocated with exactly this layout.
        unsafe { alloc::dealloc(ptr, Layout::from_size_align(cap, ALIGN).unwrap()) }
    }

    /// Bytes currently held for reuse.
    pub fn held_bytes() -> usize {
        POOL.lock().map(|p| p.bytes).unwrap_or(0)
    }
}

/// Bytes of freed tensor buffers the process holds for reuse (not part of any live tensor).
pub fn pooled_bytes() -> usize {
    pool::held_bytes()
}

/// Where a buffer's bytes live.
pub enum Bytes {
    Heap(AlignedBuf),
    Static(&'static [u8]),
    /// Any shared owner: a memory map, a `bytes::Bytes`, an artifact held in a Vec…
    Shared(Arc<dyn AsRef<[u8]> + Send + Sync>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Heap(b) => b.as_slice(),
            Bytes::Static(s) => s,
            Bytes::Shared(s) => (**s).as_ref(),
        }
    }
}

/// A window onto shared bytes.
#[derive(Clone)]
pub struct Buffer {
    bytes: Arc<Bytes>,
    offset: usize,
    len: usize,
}

impl Buffer {
    pub fn zeroed(len: usize) -> Buffer {
        Buffer { bytes: Arc::new(Bytes::Heap(AlignedBuf::zeroed(len))), offset: 0, len }
    }

    /// `len` bytes of unspecified (initialised) contents, for a caller that overwrites them all.
    pub fn recycled(len: usize) -> Buffer {
        Buffer { bytes: Arc::new(Bytes::Heap(AlignedBuf::recycled(len))), offset: 0, len }
    }

    /// True if writing through `make_mut` would not copy: heap bytes owned by this buffer alone.
    pub fn is_unique(&self) -> bool {
        Arc::strong_count(&self.bytes) == 1
            && Arc::weak_count(&self.bytes) == 0
            && matches!(*self.bytes, Bytes::Heap(_))
            && self.offset == 0
    }

    /// A window `[offset, offset+len)` of `bytes`; errors if out of bounds.
    pub fn window(bytes: Arc<Bytes>, offset: usize, len: usize) -> Result<Buffer> {
        let total = bytes.as_slice().len();
        if offset.checked_add(len).is_none_or(|end| end > total) {
            return Err(Error::InvalidArtifact(format!(
                "blob [{offset}, +{len}) lies outside the {total}-byte buffer"
            )));
        }
        Ok(Buffer { bytes, offset, len })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes.as_slice()[self.offset..self.offset + self.len]
    }

    /// Mutable bytes, copying first if the buffer is shared or not heap-owned.
    pub fn make_mut(&mut self) -> &mut [u8] {
        let unique_heap =
            matches!(Arc::get_mut(&mut self.bytes), Some(Bytes::Heap(_))) && self.offset == 0;
        if !unique_heap {
            let copy = AlignedBuf::from_bytes(self.as_slice());
            self.bytes = Arc::new(Bytes::Heap(copy));
            self.offset = 0;
        }
        match Arc::get_mut(&mut self.bytes) {
            Some(Bytes::Heap(b)) => &mut b.as_mut_slice()[..self.len],
            _ => unreachable!("buffer was just made unique"),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True if this buffer borrows bytes it does not own (artifact weights).
    pub fn is_borrowed(&self) -> bool {
        !matches!(*self.bytes, Bytes::Heap(_))
    }
}

#[derive(Clone)]
enum Data {
    Num(Buffer),
    Str(Arc<Vec<String>>),
}

/// An n-dimensional tensor of any ONNX dtype, in row-major (C) order.
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Data,
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// A zero-filled tensor (empty strings for string tensors).
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        let n = numel(shape);
        let data = if dtype == DType::String {
            Data::Str(Arc::new(vec![String::new(); n]))
        } else {
            Data::Num(Buffer::zeroed(n * dtype.size()))
        };
        Tensor { dtype, shape: shape.to_vec(), data }
    }

    /// A tensor over existing bytes (length must be numel × element size; 64-byte alignment of the
    /// window's start is required for typed views and checked there).
    pub fn from_buffer(dtype: DType, shape: &[usize], buf: Buffer) -> Result<Tensor> {
        if dtype == DType::String {
            return Err(Error::DType("string tensors cannot be built over raw bytes".into()));
        }
        let want = numel(shape) * dtype.size();
        if buf.len() != want {
            return Err(Error::Shape(format!(
                "{dtype} tensor of shape {shape:?} needs {want} bytes, buffer has {}",
                buf.len()
            )));
        }
        Ok(Tensor { dtype, shape: shape.to_vec(), data: Data::Num(buf) })
    }

    /// A tensor over bytes someone else owns (a memory map, a `bytes::Bytes`), without copying.
    /// The start need not be aligned; call `aligned()` before taking typed views.
    pub fn from_shared(
        dtype: DType,
        shape: &[usize],
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    ) -> Result<Tensor> {
        let len = (*owner).as_ref().len();
        let buf = Buffer { bytes: Arc::new(Bytes::Shared(owner)), offset: 0, len };
        let t = Tensor::from_buffer(dtype, shape, buf)?;
        if dtype == DType::Bool && t.bytes().iter().any(|b| *b > 1) {
            return Err(Error::DType("bool tensor holds bytes other than 0 and 1".into()));
        }
        Ok(t)
    }

    /// This tensor with its data 64-byte aligned (copied only if it is not).
    pub fn aligned(self) -> Tensor {
        match &self.data {
            Data::Num(b) if b.as_slice().as_ptr() as usize % ALIGN != 0 => {
                let copy = AlignedBuf::from_bytes(b.as_slice());
                let len = copy.as_slice().len();
                let buf = Buffer { bytes: Arc::new(Bytes::Heap(copy)), offset: 0, len };
                Tensor { dtype: self.dtype, shape: self.shape, data: Data::Num(buf) }
            }
            _ => self,
        }
    }

    /// A tensor copying little-endian bytes.
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
        let buf = Buffer { bytes: Arc::new(Bytes::Heap(AlignedBuf::from_bytes(bytes))), offset: 0, len: bytes.len() };
        let t = Tensor::from_buffer(dtype, shape, buf)?;
        if dtype == DType::Bool && t.bytes().iter().any(|b| *b > 1) {
            return Err(Error::DType("bool tensor holds bytes other than 0 and 1".into()));
        }
        Ok(t)
    }

    pub fn from_vec<T: Elem>(shape: &[usize], v: Vec<T>) -> Result<Tensor> {
        Tensor::from_slice_as(T::DTYPE, shape, &v)
    }

    /// Copy `v` into a tensor of `dtype` (which must be view-compatible with `T`).
    pub fn from_slice_as<T: Elem>(dtype: DType, shape: &[usize], v: &[T]) -> Result<Tensor> {
        if !T::compatible(dtype) {
            return Err(Error::DType(format!("{} data cannot hold {dtype}", T::DTYPE)));
        }
        if numel(shape) != v.len() {
            return Err(Error::Shape(format!("shape {shape:?} does not hold {} elements", v.len())));
        }
        Tensor::filled_by::<T>(dtype, shape, |out| {
            out.copy_from_slice(v);
            Ok(())
        })
    }

    /// A new numeric tensor whose elements `fill` writes. The buffer handed to `fill` holds
    /// unspecified values (reused memory, never uninitialised): `fill` must write every element.
    /// This skips the zero fill of `zeros` for kernels that overwrite their whole output.
    pub fn filled_by<T: Elem>(
        dtype: DType,
        shape: &[usize],
        fill: impl FnOnce(&mut [T]) -> Result<()>,
    ) -> Result<Tensor> {
        if !T::compatible(dtype) || dtype == DType::String {
            return Err(Error::DType(format!("{} data cannot hold {dtype}", T::DTYPE)));
        }
        let n = numel(shape);
        // bool is the one element type with invalid bit patterns: its buffer starts zeroed.
        let mut buf = if T::DTYPE == DType::Bool {
            Buffer::zeroed(n * dtype.size())
        } else {
            Buffer::recycled(n * dtype.size())
        };
        if n > 0 {
            let bytes = buf.make_mut();
            // SAFETY: fresh heap buffers are 64-byte aligned and hold n elements; the bytes are
            // initialised and (bool aside, zeroed above) any bit pattern is a valid T.
            let out = unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, n) };
            fill(out)?;
        }
        Ok(Tensor { dtype, shape: shape.to_vec(), data: Data::Num(buf) })
    }

    /// True if this tensor's bytes are owned by it alone (writing to them would not copy).
    pub fn is_unique(&self) -> bool {
        matches!(&self.data, Data::Num(b) if b.is_unique())
    }

    pub fn scalar<T: Elem>(v: T) -> Tensor {
        Tensor::from_vec(&[], vec![v]).expect("scalar")
    }

    pub fn from_strings(shape: &[usize], v: Vec<String>) -> Result<Tensor> {
        if numel(shape) != v.len() {
            return Err(Error::Shape(format!("shape {shape:?} does not hold {} strings", v.len())));
        }
        Ok(Tensor { dtype: DType::String, shape: shape.to_vec(), data: Data::Str(Arc::new(v)) })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Same data, new shape (element count must match). Never copies.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.len() {
            return Err(Error::Shape(format!(
                "cannot reshape {:?} ({} elements) to {:?}",
                self.shape,
                self.len(),
                shape
            )));
        }
        Ok(Tensor { dtype: self.dtype, shape: shape.to_vec(), data: self.data.clone() })
    }

    /// Raw little-endian bytes of a numeric tensor (empty for strings).
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Num(b) => b.as_slice(),
            Data::Str(_) => &[],
        }
    }

    pub fn buffer(&self) -> Option<&Buffer> {
        match &self.data {
            Data::Num(b) => Some(b),
            Data::Str(_) => None,
        }
    }

    pub fn strings(&self) -> Result<&[String]> {
        match &self.data {
            Data::Str(s) => Ok(s),
            Data::Num(_) => Err(Error::DType(format!("expected a string tensor, got {}", self.dtype))),
        }
    }

    pub fn strings_mut(&mut self) -> Result<&mut Vec<String>> {
        match &mut self.data {
            Data::Str(s) => Ok(Arc::make_mut(s)),
            Data::Num(_) => Err(Error::DType(format!("expected a string tensor, got {}", self.dtype))),
        }
    }

    /// The elements as `&[T]`; errors if `T` does not match the dtype.
    pub fn view<T: Elem>(&self) -> Result<&[T]> {
        if !T::compatible(self.dtype) {
            return Err(Error::DType(format!("expected {}, got {}", T::DTYPE, self.dtype)));
        }
        let bytes = self.bytes();
        if bytes.is_empty() {
            return Ok(&[]);
        }
        if (bytes.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
            return Err(Error::InvalidArtifact("tensor data is not aligned".into()));
        }
        // SAFETY: T is plain old data (Elem contract), pointer aligned, length exact.
        Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, self.len()) })
    }

    /// Mutable elements, copying the buffer first if it is shared.
    pub fn view_mut<T: Elem>(&mut self) -> Result<&mut [T]> {
        if !T::compatible(self.dtype) {
            return Err(Error::DType(format!("expected {}, got {}", T::DTYPE, self.dtype)));
        }
        let n = numel(&self.shape);
        match &mut self.data {
            Data::Num(b) => {
                let bytes = b.make_mut();
                if bytes.is_empty() {
                    return Ok(&mut []);
                }
                // SAFETY: heap buffers are 64-byte aligned; T is POD.
                Ok(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, n) })
            }
            Data::Str(_) => Err(Error::DType("string tensor has no numeric view".into())),
        }
    }

    /// The single element of a one-element tensor.
    pub fn item<T: Elem>(&self) -> Result<T> {
        let v = self.view::<T>()?;
        if v.len() != 1 {
            return Err(Error::Shape(format!("expected one element, got shape {:?}", self.shape)));
        }
        Ok(v[0])
    }

    /// Copy into an ndarray (the public tensor type at API edges).
    pub fn to_array<T: Elem>(&self) -> Result<ndarray::ArrayD<T>> {
        let v = self.view::<T>()?.to_vec();
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&self.shape), v)
            .map_err(|e| Error::Shape(e.to_string()))
    }

    /// Any integer tensor's elements widened to i64 (for shape-like inputs: axes, pads, sizes…).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        Ok(match self.dtype {
            DType::I64 => self.view::<i64>()?.to_vec(),
            DType::I32 => self.view::<i32>()?.iter().map(|&x| x as i64).collect(),
            DType::I16 => self.view::<i16>()?.iter().map(|&x| x as i64).collect(),
            DType::I8 | DType::I4 | DType::I2 => {
                self.view::<i8>()?.iter().map(|&x| x as i64).collect()
            }
            DType::U8 | DType::U4 | DType::U2 => {
                self.view::<u8>()?.iter().map(|&x| x as i64).collect()
            }
            DType::U16 => self.view::<u16>()?.iter().map(|&x| x as i64).collect(),
            DType::U32 => self.view::<u32>()?.iter().map(|&x| x as i64).collect(),
            DType::U64 => self.view::<u64>()?.iter().map(|&x| x as i64).collect(),
            DType::Bool => self.view::<bool>()?.iter().map(|&x| x as i64).collect(),
            d => return Err(Error::DType(format!("expected an integer tensor, got {d}"))),
        })
    }

    /// Any real tensor's elements as f64 (for comparisons, calibration, reports).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        Ok(match self.dtype {
            DType::F32 => self.view::<f32>()?.iter().map(|&x| x as f64).collect(),
            DType::F64 => self.view::<f64>()?.to_vec(),
            DType::F16 => self.view::<half::f16>()?.iter().map(|x| x.to_f64()).collect(),
            DType::BF16 => self.view::<half::bf16>()?.iter().map(|x| x.to_f64()).collect(),
            d if d.is_int() || d == DType::Bool => {
                if d == DType::U64 {
                    self.view::<u64>()?.iter().map(|&x| x as f64).collect()
                } else {
                    self.to_i64_vec()?.into_iter().map(|x| x as f64).collect()
                }
            }
            d => return Err(Error::DType(format!("cannot widen {d} to f64"))),
        })
    }
}

impl<T: Elem> From<ndarray::ArrayD<T>> for Tensor {
    fn from(a: ndarray::ArrayD<T>) -> Tensor {
        let shape = a.shape().to_vec();
        let v: Vec<T> = a.iter().copied().collect();
        Tensor::from_vec(&shape, v).expect("ndarray shape matches its data")
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor<{}>{:?}", self.dtype, self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_cover_requests_with_bounded_slack() {
        for len in (1..5000).chain([4095, 4096, 4097, 1 << 20, (1 << 20) + 1, 123_456_789]) {
            let c = pool::class(len);
            assert!(c >= len && c % ALIGN == 0, "{len} -> {c}");
            assert!(c - len <= (len / 8).max(ALIGN - 1), "{len} -> {c}");
            assert_eq!(pool::class(c), c, "a class is its own class");
        }
    }

    #[test]
    fn recycled_buffers_are_rezeroed_by_zeros() {
        // Dirty a block, free it, and ask for zeros of the same class many times: whichever block
        // the pool hands out (other tests run concurrently), it must read as zeros.
        for _ in 0..8 {
            let mut t = Tensor::filled_by::<f32>(DType::F32, &[1000], |o| {
                o.fill(f32::NAN);
                Ok(())
            })
            .unwrap();
            assert!(t.view_mut::<f32>().unwrap().iter().all(|v| v.is_nan()));
            drop(t);
            let z = Tensor::zeros(DType::F32, &[999]);
            assert!(z.view::<f32>().unwrap().iter().all(|&v| v == 0.0));
            let b = Tensor::filled_by::<bool>(DType::Bool, &[4000], |_| Ok(())).unwrap();
            assert!(b.bytes().iter().all(|&v| v == 0));
        }
    }

    #[test]
    fn large_requests_borrow_a_free_block_of_a_larger_class() {
        // Sizes no other test uses, so the blocks seen here are this test's.
        let (b, _) = AlignedBuf::block(777_777);
        let (ptr, cap) = (b.ptr, b.cap);
        drop(b);
        let (mut s, fresh) = AlignedBuf::block(500_001);
        assert!(!fresh && s.ptr == ptr && s.cap == cap && s.len == 500_001, "borrowed the freed block");
        s.as_mut_slice().fill(0xFF);
        drop(s);
        // More than twice smaller: not borrowed; zeros stay zeros whichever block serves them.
        let (t, _) = AlignedBuf::block(300_001);
        assert_ne!(t.ptr, ptr);
        let z = AlignedBuf::zeroed(600_001);
        assert!(z.as_slice().iter().all(|&v| v == 0));
    }

    #[test]
    fn filled_by_checks_dtype_and_propagates_errors() {
        assert!(Tensor::filled_by::<f32>(DType::I32, &[2], |_| Ok(())).is_err());
        assert!(Tensor::filled_by::<f32>(DType::F32, &[2], |_| Err(Error::Other("x".into()))).is_err());
        let t = Tensor::filled_by::<i64>(DType::I64, &[0, 3], |_| panic!("no elements")).unwrap();
        assert_eq!(t.shape(), &[0, 3]);
        let t = Tensor::from_vec(&[3], vec![1i32, 2, 3]).unwrap();
        assert_eq!(t.view::<i32>().unwrap(), &[1, 2, 3]);
    }

    #[test]
    fn uniqueness_tracks_sharing() {
        let t = Tensor::from_vec(&[4], vec![1f32; 4]).unwrap();
        assert!(t.is_unique());
        let r = t.reshape(&[2, 2]).unwrap();
        assert!(!t.is_unique() && !r.is_unique());
        drop(r);
        assert!(t.is_unique());
        static W: [u8; 8] = [0; 8];
        let s = Tensor::from_buffer(DType::F32, &[2], Buffer { bytes: Arc::new(Bytes::Static(&W)), offset: 0, len: 8 }).unwrap();
        assert!(!s.is_unique());
        assert!(!Tensor::from_strings(&[1], vec!["a".into()]).unwrap().is_unique());
    }
}
