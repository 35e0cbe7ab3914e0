//! Pruning passes (H8 fills this in).

use kiln_compiler::pass::Pass;
use kiln_runtime::{Error, Result};

use super::{CompressOptions, Prune};

pub fn pass(_p: Prune, _opts: &CompressOptions) -> Result<Box<dyn Pass>> {
    Err(Error::Other("--prune: not implemented yet".into()))
}
