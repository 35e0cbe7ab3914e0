//! The artifact manifest: prost messages describing the program (values, steps, attributes,
//! constants) and its metadata. Field numbers are part of the file format: only ever add fields.

/// Bump when a change to these messages or the container would make old readers misread a file.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Manifest {
    #[prost(uint32, tag = "1")]
    pub format_version: u32,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<Metadata>,
    #[prost(message, optional, tag = "3")]
    pub program: Option<Program>,
    /// Weight blobs: byte ranges of the weight section, each starting 64-byte aligned.
    #[prost(message, repeated, tag = "4")]
    pub blobs: Vec<Blob>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    #[prost(string, tag = "1")]
    pub source_sha256: String,
    #[prost(string, tag = "2")]
    pub kiln_version: String,
    /// The target the artifact was compiled for (e.g. "cpu-generic").
    #[prost(string, tag = "3")]
    pub target: String,
    #[prost(string, repeated, tag = "4")]
    pub passes: Vec<String>,
    #[prost(string, tag = "5")]
    pub source_name: String,
    #[prost(string, tag = "6")]
    pub producer: String,
    #[prost(message, repeated, tag = "7")]
    pub opsets: Vec<Opset>,
    /// metadata_props and doc strings carried over from the source model.
    #[prost(message, repeated, tag = "8")]
    pub props: Vec<KeyValue>,
    #[prost(int64, tag = "9")]
    pub ir_version: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Opset {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Blob {
    #[prost(uint64, tag = "1")]
    pub offset: u64,
    #[prost(uint64, tag = "2")]
    pub len: u64,
}

/// One graph: the top-level program or the body of an If/Loop/Scan.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Program {
    /// Every value, indexed by value id.
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<ValueInfo>,
    #[prost(uint32, repeated, tag = "2")]
    pub inputs: Vec<u32>,
    #[prost(uint32, repeated, tag = "3")]
    pub outputs: Vec<u32>,
    /// Values that hold constants (weights).
    #[prost(message, repeated, tag = "4")]
    pub constants: Vec<ConstBinding>,
    /// Steps in execution order.
    #[prost(message, repeated, tag = "5")]
    pub steps: Vec<Step>,
    /// For subgraphs: inner values bound to values of the enclosing program.
    #[prost(message, repeated, tag = "6")]
    pub captures: Vec<Capture>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Capture {
    #[prost(uint32, tag = "1")]
    pub inner: u32,
    #[prost(uint32, tag = "2")]
    pub outer: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, prost::Enumeration)]
#[repr(i32)]
pub enum ValueKind {
    Tensor = 0,
    Sequence = 1,
    Optional = 2,
    /// Type not known at compile time.
    Unknown = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "ValueKind", tag = "2")]
    pub kind: i32,
    /// ONNX dtype number of the tensor (or of the sequence's / optional's elements); 0 if unknown.
    #[prost(int32, tag = "3")]
    pub dtype: i32,
    /// False when even the rank is unknown.
    #[prost(bool, tag = "4")]
    pub has_shape: bool,
    #[prost(message, repeated, tag = "5")]
    pub dims: Vec<Dim>,
}

/// A dimension: a fixed size (`size >= 0`) or a symbol (`size == -1`; empty symbol = unknown).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
    #[prost(string, tag = "2")]
    pub symbol: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ConstBinding {
    #[prost(uint32, tag = "1")]
    pub value: u32,
    #[prost(message, optional, tag = "2")]
    pub tensor: Option<TensorData>,
}

/// Constant tensor contents: in a weight blob, or inline for small ones and strings.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorData {
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(uint64, repeated, tag = "2")]
    pub dims: Vec<u64>,
    /// Index into `Manifest::blobs`, when the data lives in the weight section.
    #[prost(uint32, optional, tag = "3")]
    pub blob: Option<u32>,
    /// Little-endian element bytes, when inline.
    #[prost(bytes = "vec", tag = "4")]
    pub inline: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "5")]
    pub strings: Vec<Vec<u8>>,
    /// Set when the stored bytes (blob or inline) are sparse-encoded instead of dense; absent in
    /// dense data and in every artifact written before the field existed. See `Sparse`.
    #[prost(message, optional, tag = "6")]
    pub sparse: Option<Sparse>,
}

/// Sparse encoding of constant bytes, chosen by the writer when it is smaller than dense
/// (typically pruned weights). The dense bytes are split into units of `unit` bytes
/// (1, 2, 4 or 8; it divides the dense length, which is numel × element size); a unit is zero
/// when all its bytes are. The stored bytes are a bitmap with one bit per unit (bit `i % 8` of
/// byte `i / 8` set = unit `i` is non-zero; unused bits of the last byte are zero) followed by
/// the `nnz` non-zero units in order, so they are `ceil(units / 8) + nnz × unit` bytes long.
/// Readers expand them into a dense aligned buffer at load.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sparse {
    #[prost(uint32, tag = "1")]
    pub unit: u32,
    /// Number of set bits in the bitmap (= non-zero units stored after it).
    #[prost(uint64, tag = "2")]
    pub nnz: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Step {
    #[prost(string, tag = "1")]
    pub op: String,
    #[prost(string, tag = "2")]
    pub domain: String,
    /// The opset version of `domain` the source model imports: kernels follow that version's semantics.
    #[prost(int64, tag = "3")]
    pub opset: i64,
    #[prost(string, tag = "4")]
    pub name: String,
    /// Value ids; -1 marks an omitted optional input.
    #[prost(sint32, repeated, tag = "5")]
    pub inputs: Vec<i32>,
    /// Value ids; -1 marks an omitted optional output.
    #[prost(sint32, repeated, tag = "6")]
    pub outputs: Vec<i32>,
    #[prost(message, repeated, tag = "7")]
    pub attrs: Vec<Attr>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, prost::Enumeration)]
#[repr(i32)]
pub enum AttrKind {
    Undefined = 0,
    Float = 1,
    Int = 2,
    String = 3,
    Tensor = 4,
    Graph = 5,
    Floats = 6,
    Ints = 7,
    Strings = 8,
    Tensors = 9,
    Graphs = 10,
    TypeProto = 11,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Attr {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "AttrKind", tag = "2")]
    pub kind: i32,
    #[prost(float, tag = "3")]
    pub f: f32,
    #[prost(int64, tag = "4")]
    pub i: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub s: Vec<u8>,
    #[prost(message, optional, tag = "6")]
    pub t: Option<TensorData>,
    #[prost(message, optional, tag = "7")]
    pub g: Option<Program>,
    #[prost(float, repeated, tag = "8")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "9")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "10")]
    pub strings: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "11")]
    pub tensors: Vec<TensorData>,
    #[prost(message, repeated, tag = "12")]
    pub graphs: Vec<Program>,
    /// For TypeProto attributes (e.g. Optional's `type`): the element dtype, 0 if none.
    #[prost(int32, tag = "13")]
    pub type_dtype: i32,
    #[prost(enumeration = "ValueKind", tag = "14")]
    pub type_kind: i32,
}

impl Step {
    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|a| a.name == name)
    }
}

impl ValueInfo {
    /// Human-readable type, e.g. `f32[batch,128,384]`.
    pub fn type_string(&self) -> String {
        let dt = crate::DType::from_onnx(self.dtype).map(|d| d.name()).unwrap_or("?");
        let shape = if self.has_shape {
            let dims: Vec<String> = self
                .dims
                .iter()
                .map(|d| {
                    if d.size >= 0 {
                        d.size.to_string()
                    } else if d.symbol.is_empty() {
                        "?".to_string()
                    } else {
                        d.symbol.clone()
                    }
                })
                .collect();
            format!("[{}]", dims.join(","))
        } else {
            "[..]".to_string()
        };
        match self.kind() {
            ValueKind::Tensor => format!("{dt}{shape}"),
            ValueKind::Sequence => format!("seq<{dt}{shape}>"),
            ValueKind::Optional => format!("optional<{dt}{shape}>"),
            ValueKind::Unknown => "?".to_string(),
        }
    }
}
