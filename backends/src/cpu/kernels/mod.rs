//! CPU kernels, one file per family. Each file has `pub fn register(r: &mut Registry)`.

use super::registry::Registry;

pub mod attention;
pub mod cast;
pub mod conv;
mod conv_direct;
mod conv_dw;
pub mod elementwise;
pub mod fused;
pub mod index;
pub mod int4;
pub mod logic;
pub mod matmul;
pub mod misc;
pub mod ml;
pub mod norm;
pub mod pool;
pub mod qlinear;
pub mod quant;
pub mod reduce;
pub mod resize;
pub mod rnn;
pub mod roi;
pub mod sequence;
pub mod shape;
pub mod softmax;
pub mod training;
pub mod text;
pub mod unary;

pub fn register_all(r: &mut Registry) {
    attention::register(r);
    cast::register(r);
    conv::register(r);
    elementwise::register(r);
    fused::register(r);
    index::register(r);
    int4::register(r);
    logic::register(r);
    matmul::register(r);
    misc::register(r);
    ml::register(r);
    norm::register(r);
    pool::register(r);
    qlinear::register(r);
    quant::register(r);
    reduce::register(r);
    resize::register(r);
    rnn::register(r);
    roi::register(r);
    sequence::register(r);
    shape::register(r);
    softmax::register(r);
    training::register(r);
    text::register(r);
    unary::register(r);
}
