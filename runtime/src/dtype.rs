//! Element types, numbered exactly as ONNX's TensorProto.DataType so the number can travel through
//! the artifact manifest unchanged.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i32)]
pub enum DType {
    F32 = 1,
    U8 = 2,
    I8 = 3,
    U16 = 4,
    I16 = 5,
    I32 = 6,
    I64 = 7,
    String = 8,
    Bool = 9,
    F16 = 10,
    F64 = 11,
    U32 = 12,
    U64 = 13,
    Complex64 = 14,
    Complex128 = 15,
    BF16 = 16,
    F8E4M3FN = 17,
    F8E4M3FNUZ = 18,
    F8E5M2 = 19,
    F8E5M2FNUZ = 20,
    U4 = 21,
    I4 = 22,
    F4E2M1 = 23,
    F8E8M0 = 24,
    U2 = 25,
    I2 = 26,
}

impl DType {
    pub const ALL: [DType; 26] = [
        DType::F32, DType::U8, DType::I8, DType::U16, DType::I16, DType::I32, DType::I64,
        DType::String, DType::Bool, DType::F16, DType::F64, DType::U32, DType::U64,
        DType::Complex64, DType::Complex128, DType::BF16, DType::F8E4M3FN, DType::F8E4M3FNUZ,
        DType::F8E5M2, DType::F8E5M2FNUZ, DType::U4, DType::I4, DType::F4E2M1, DType::F8E8M0,
        DType::U2, DType::I2,
    ];

    /// The ONNX TensorProto.DataType number.
    pub fn onnx_code(self) -> i32 {
        self as i32
    }

    pub fn from_onnx(code: i32) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| *d as i32 == code)
    }

    /// Bytes one element takes in memory. Sub-byte types (int2, uint2, int4, uint4, float4) are
    /// kept unpacked, one element per byte, so kernels can index them; they are packed only in
    /// files.
    pub fn size(self) -> usize {
        use DType::*;
        match self {
            U8 | I8 | Bool | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ | U4 | I4 | F4E2M1
            | F8E8M0 | U2 | I2 => 1,
            U16 | I16 | F16 | BF16 => 2,
            F32 | I32 | U32 => 4,
            F64 | I64 | U64 | Complex64 => 8,
            Complex128 => 16,
            String => std::mem::size_of::<std::string::String>(),
        }
    }

    pub fn is_float(self) -> bool {
        use DType::*;
        matches!(
            self,
            F32 | F64 | F16 | BF16 | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ | F4E2M1 | F8E8M0
        )
    }

    pub fn is_int(self) -> bool {
        use DType::*;
        matches!(self, U8 | I8 | U16 | I16 | I32 | I64 | U32 | U64 | U4 | I4 | U2 | I2)
    }

    pub fn is_signed_int(self) -> bool {
        use DType::*;
        matches!(self, I8 | I16 | I32 | I64 | I4 | I2)
    }

    /// Lower-case name as used in IR dumps and `kiln inspect` (numpy-like where numpy has one).
    pub fn name(self) -> &'static str {
        use DType::*;
        match self {
            F32 => "f32",
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            String => "string",
            Bool => "bool",
            F16 => "f16",
            F64 => "f64",
            U32 => "u32",
            U64 => "u64",
            Complex64 => "c64",
            Complex128 => "c128",
            BF16 => "bf16",
            F8E4M3FN => "f8e4m3fn",
            F8E4M3FNUZ => "f8e4m3fnuz",
            F8E5M2 => "f8e5m2",
            F8E5M2FNUZ => "f8e5m2fnuz",
            U4 => "u4",
            I4 => "i4",
            F4E2M1 => "f4e2m1",
            F8E8M0 => "f8e8m0",
            U2 => "u2",
            I2 => "i2",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Rust types that can be viewed as the elements of a tensor buffer.
///
/// # Safety
/// Implementors must be plain old data: every bit pattern valid, no padding, no drop glue.
pub unsafe trait Elem: Copy + Send + Sync + Default + PartialEq + fmt::Debug + 'static {
    /// The dtype whose in-memory element this Rust type is.
    const DTYPE: DType;
    /// Whether a buffer of `dtype` may be viewed as `[Self]` (same in-memory representation).
    fn compatible(dtype: DType) -> bool {
        dtype == Self::DTYPE
    }
}

macro_rules! elem {
    ($t:ty, $d:expr) => {
        unsafe impl Elem for $t {
            const DTYPE: DType = $d;
        }
    };
}
elem!(f32, DType::F32);
elem!(f64, DType::F64);
elem!(i16, DType::I16);
elem!(i32, DType::I32);
elem!(i64, DType::I64);
elem!(u16, DType::U16);
elem!(u32, DType::U32);
elem!(u64, DType::U64);
elem!(bool, DType::Bool);
elem!(half::f16, DType::F16);
elem!(half::bf16, DType::BF16);

// int4/int2 are kept unpacked as one i8 per element; the float8/float4 kinds and uint4/uint2 as raw
// u8 codes.
unsafe impl Elem for i8 {
    const DTYPE: DType = DType::I8;
    fn compatible(dtype: DType) -> bool {
        matches!(dtype, DType::I8 | DType::I4 | DType::I2)
    }
}
unsafe impl Elem for u8 {
    const DTYPE: DType = DType::U8;
    fn compatible(dtype: DType) -> bool {
        matches!(
            dtype,
            DType::U8
                | DType::U4
                | DType::U2
                | DType::F8E4M3FN
                | DType::F8E4M3FNUZ
                | DType::F8E5M2
                | DType::F8E5M2FNUZ
                | DType::F4E2M1
                | DType::F8E8M0
        )
    }
}
