//! int4 weight-only quantization (H7 fills this in).

use kiln_compiler::pass::Pass;
use kiln_runtime::{Error, Result};

use super::CompressOptions;

pub fn pass(_opts: &CompressOptions) -> Result<Box<dyn Pass>> {
    Err(Error::Other("--quantize int4: not implemented yet".into()))
}
