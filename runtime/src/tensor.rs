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

/// Owned, zero-initialised, 64-byte-aligned bytes.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf { ptr: ALIGN as *mut u8, len: 0 };
        }
        let layout = Layout::from_size_align(len, ALIGN).expect("buffer size overflows");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    pub fn from_bytes(bytes: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (or dangling+aligned with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            let layout = Layout::from_size_align(self.len, ALIGN).unwrap();
            unsafe { alloc::dealloc(self.ptr, layout) }
        }
    }
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
        let mut t = Tensor::zeros(dtype, shape);
        t.view_mut::<T>()?.copy_from_slice(v);
        Ok(t)
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
