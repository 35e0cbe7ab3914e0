//! kiln's own fused ops (domain "kiln"), produced by the fusion passes in kiln-passes:
//!
//! - `FusedMatMul(A[..., K], W[K, N], bias[N])`: one GEMM over all leading rows of A with bias
//!   and activation applied by the GEMM epilogue while each tile is hot.
//! - `FusedConv(X, W, B?)`: Conv (same attributes) followed by the activation.
//!
//! Both take `activation` (Relu, Sigmoid, Tanh, HardSwish, Silu, LeakyRelu, HardSigmoid, Gelu,
//! GeluTanh, Clip) and `activation_params` (alpha / alpha, beta / min, max).

use rayon::prelude::*;

use kiln_runtime::{DType, Error, Result, Tensor};

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;

use crate::cpu::gemm::{self, Act, Epilogue, MatRef};
use crate::cpu::gemm::apply_act as apply_act_slice;

pub fn register(r: &mut Registry) {
    r.add_in("kiln", "FusedMatMul", fused_matmul);
    r.add_in("kiln", "FusedConv", fused_conv);
}

/// The fused activation named by the node's attributes, as the GEMM epilogue's `Act` (one
/// definition of each activation for GEMM epilogues and fused ops alike).
pub(crate) fn act_from_ctx(ctx: &OpCtx) -> Result<Act> {
    let p = ctx.attr_floats("activation_params").unwrap_or_default();
    let at = |i: usize, d: f32| p.get(i).copied().unwrap_or(d);
    Ok(match ctx.attr_s("activation", "").as_str() {
        "" => Act::None,
        "Relu" => Act::Relu,
        "Sigmoid" => Act::Sigmoid,
        "Tanh" => Act::Tanh,
        "HardSwish" => Act::HardSwish,
        "Silu" => Act::Silu,
        "LeakyRelu" => Act::LeakyRelu(at(0, 0.01)),
        "HardSigmoid" => Act::HardSigmoid(at(0, 0.2), at(1, 0.5)),
        "Gelu" => Act::GeluErf,
        "GeluTanh" => Act::GeluTanh,
        "Clip" => Act::Clip(at(0, f32::MIN), at(1, f32::MAX)),
        a => return Err(ctx.unsupported(format!("activation '{a}'"))),
    })
}

/// The activation over a whole output, split across the pool when it is large.
fn apply_act(v: &mut [f32], act: Act) {
    if act == Act::None {
        return;
    }
    if v.len() >= 1 << 15 && crate::cpu::par::threads() > 1 {
        v.par_chunks_mut(1 << 13).for_each(|c| apply_act_slice(c, act));
    } else {
        apply_act_slice(v, act);
    }
}

fn f32_input<'a>(ctx: &OpCtx, inputs: &'a [Option<Tensor>], i: usize) -> Result<&'a Tensor> {
    let t = ctx.input(inputs, i)?;
    if t.dtype() != DType::F32 {
        return Err(Error::DType(format!("{}: input {i} is {}, expected f32", ctx.op(), t.dtype())));
    }
    Ok(t)
}

fn fused_matmul(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let a = f32_input(ctx, inputs, 0)?;
    let act = act_from_ctx(ctx)?;
    let packed = ctx.attr_i("packed_b", 0) != 0;
    // W is [K, N] f32, or (after the prepack pass) PackedB bytes with `b_shape` = [K, N].
    let (k, n) = if packed {
        match ctx.attr_ints("b_shape").as_deref() {
            Some(&[k, n]) if k >= 0 && n >= 0 => (k as usize, n as usize),
            _ => return Err(Error::Other(format!("{}: packed_b without a valid b_shape", ctx.op()))),
        }
    } else {
        let w = f32_input(ctx, inputs, 1)?;
        if w.rank() != 2 {
            return Err(Error::Shape(format!("FusedMatMul: W {:?} is not 2-D", w.shape())));
        }
        (w.shape()[0], w.shape()[1])
    };
    if a.rank() < 1 || a.shape()[a.rank() - 1] != k {
        return Err(Error::Shape(format!("FusedMatMul: A {:?} · W [{k}, {n}]", a.shape())));
    }
    let m = a.len() / k.max(1);
    let mut out_shape = a.shape().to_vec();
    *out_shape.last_mut().unwrap() = n;
    let bias = match ctx.opt_input(inputs, 2) {
        Some(b) if b.dtype() == DType::F32 && b.len() == n => Some(b.view::<f32>()?),
        Some(b) => return Err(Error::Shape(format!("FusedMatMul: bias {:?} for {n} columns", b.shape()))),
        None => None,
    };
    // Bias and activation run in the GEMM's epilogue, on each tile while it is in cache. The
    // output comes from the buffer pool unfilled: the product writes every element (a fresh
    // zeroed Vec page-faulted and was then copied, 0.5 ms of MiniLM's 3 ms FFN product).
    let a = MatRef::rows(a.view::<f32>()?, k);
    let epi = Epilogue::new(bias, act);
    let y = if packed {
        let bytes = packed_weight_bytes(ctx, inputs)?;
        // Zero-copy over the artifact constant when aligned; a copy otherwise.
        let copied;
        let view = match gemm::PackedView::from_bytes(bytes)? {
            Some(v) => v,
            None => {
                copied = gemm::PackedB::from_bytes(bytes)?;
                copied.view()
            }
        };
        Tensor::filled_by::<f32>(DType::F32, &out_shape, |c| {
            gemm::sgemm(m, n, k, a, gemm::BRef::PackedView(view), c, n, false, &epi, true)
        })?
    } else {
        let w = MatRef::rows(ctx.input(inputs, 1)?.view::<f32>()?, n);
        Tensor::filled_by::<f32>(DType::F32, &out_shape, |c| gemm::sgemm(m, n, k, a, gemm::BRef::Mat(w), c, n, false, &epi, true))?
    };
    Ok(vec![y])
}

/// The bytes of a prepacked FusedMatMul weight (a U8 tensor).
fn packed_weight_bytes<'a>(ctx: &OpCtx, inputs: &'a [Option<Tensor>]) -> Result<&'a [u8]> {
    let w = ctx.input(inputs, 1)?;
    if w.dtype() != DType::U8 {
        return Err(Error::DType(format!("{}: packed weight is {}, expected u8", ctx.op(), w.dtype())));
    }
    w.view::<u8>()
}

fn fused_conv(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let act = act_from_ctx(ctx)?;
    if ctx.input(inputs, 0)?.dtype() == DType::F32 {
        // Bias and activation run inside the f32 conv kernels, on each tile while it is in cache.
        return super::conv::conv_act(ctx, inputs, act);
    }
    let mut y = super::conv::conv(ctx, inputs)?.swap_remove(0);
    if act != Act::None {
        if y.dtype() != DType::F32 {
            return Err(Error::DType(format!("FusedConv activation on {} output", y.dtype())));
        }
        apply_act(y.view_mut::<f32>()?, act);
    }
    Ok(vec![y])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::elementwise::testing::run_kiln as run;
    use kiln_runtime::manifest::Attr;


    fn act(name: &str, params: Vec<f32>) -> Vec<Attr> {
        vec![
            Attr { name: "activation".into(), s: name.as_bytes().to_vec(), ..Default::default() },
            Attr { name: "activation_params".into(), floats: params, ..Default::default() },
        ]
    }

    #[test]
    fn fused_matmul_bias_relu() {
        // [1,2,2] · [2,3] + [3], then Relu.
        let a = Tensor::from_vec(&[1, 2, 2], vec![1f32, 2., -1., 0.]).unwrap();
        let w = Tensor::from_vec(&[2, 3], vec![1f32, 0., 1., 0., 1., -1.]).unwrap();
        let b = Tensor::from_vec(&[3], vec![0.5f32, -3., 0.]).unwrap();
        let y = run("FusedMatMul", act("Relu", vec![]), vec![Some(a), Some(w), Some(b)]).unwrap();
        assert_eq!(y[0].shape(), &[1, 2, 3]);
        // rows: [1,2]·W = [1,2,-1] + b = [1.5,-1,-1] → relu [1.5,0,0]; [-1,0]·W = [-1,0,-1] + b → [0,0,0]
        assert_eq!(y[0].view::<f32>().unwrap(), &[1.5, 0., 0., 0., 0., 0.]);
    }

    #[test]
    fn fused_matmul_rejects_bad_bias_and_activation() {
        let a = Tensor::from_vec(&[1, 2], vec![1f32, 2.]).unwrap();
        let w = Tensor::from_vec(&[2, 1], vec![1f32, 1.]).unwrap();
        let b = Tensor::from_vec(&[2], vec![0f32, 0.]).unwrap();
        assert!(run("FusedMatMul", vec![], vec![Some(a.clone()), Some(w.clone()), Some(b)]).is_err());
        assert!(run("FusedMatMul", act("Nope", vec![]), vec![Some(a), Some(w), None]).is_err());
    }

    #[test]
    fn activations_match_their_definitions() {
        let mut v = vec![-4f32, -0.5, 0., 0.5, 4.];
        apply_act(&mut v, Act::HardSwish);
        assert_eq!(v, vec![-0., -0.5 * (2.5 / 6.0), 0., 0.5 * (3.5 / 6.0), 4.]);
        let mut v = vec![-2f32, 0., 7.];
        apply_act(&mut v, Act::Clip(0., 6.));
        assert_eq!(v, vec![0., 0., 6.]);
        let mut v = vec![1f32];
        apply_act(&mut v, Act::GeluErf);
        assert!((v[0] - 0.841_344_7).abs() < 1e-6);
        let mut v = vec![-1f32];
        apply_act(&mut v, Act::LeakyRelu(0.1));
        assert_eq!(v, vec![-0.1]);
    }

    #[test]
    fn fused_conv_applies_activation() {
        // 1x1 conv with weight -1 then Relu: negatives of the input, clipped at 0.
        let x = Tensor::from_vec(&[1, 1, 1, 3], vec![1f32, -2., 3.]).unwrap();
        let w = Tensor::from_vec(&[1, 1, 1, 1], vec![-1f32]).unwrap();
        let y = run("FusedConv", act("Relu", vec![]), vec![Some(x), Some(w), None]).unwrap();
        assert_eq!(y[0].view::<f32>().unwrap(), &[0., 2., 0.]);
    }
}
