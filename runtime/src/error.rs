//! The runtime's error type. Every failure a user can cause (bad artifact, bad input, unsupported
//! op) is an `Error`, never a panic.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid artifact: {0}")]
    InvalidArtifact(String),
    #[error("artifact format version {found} is not supported (this kiln reads version {supported})")]
    Version { found: u32, supported: u32 },
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("input error: {0}")]
    Input(String),
    #[error("shape error: {0}")]
    Shape(String),
    #[error("dtype error: {0}")]
    DType(String),
    #[error("unsupported op {op} (domain '{domain}', opset {opset}) at node '{node}'{}", if .detail.is_empty() { String::new() } else { format!(": {}", .detail) })]
    Unsupported { op: String, domain: String, opset: i64, node: String, detail: String },
    #[error("{op} node '{node}': {msg}")]
    Kernel { op: String, node: String, msg: String },
    #[error("{0}")]
    Other(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Attach the node an error happened at (used by backends around each kernel call).
    pub fn at_node(self, op: &str, node: &str) -> Error {
        match self {
            e @ (Error::Unsupported { .. } | Error::Kernel { .. }) => e,
            e => Error::Kernel { op: op.to_string(), node: node.to_string(), msg: e.to_string() },
        }
    }
}

/// Shorthand for a kernel-level error message.
pub fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Other(msg.into()))
}
