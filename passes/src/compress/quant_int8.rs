//! int8 quantization passes (H5 fills this in).

use kiln_compiler::pass::Pass;
use kiln_runtime::{Error, Result};

use super::CompressOptions;

pub fn pass(_opts: &CompressOptions) -> Result<Box<dyn Pass>> {
    Err(Error::Other("--quantize int8 / int8-dynamic: not implemented yet".into()))
}
