//! (to be written)

use crate::cpu::registry::Registry;

pub fn register(_r: &mut Registry) {}
