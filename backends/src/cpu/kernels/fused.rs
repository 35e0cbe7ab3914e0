//! kiln's own fused ops (domain "kiln"), produced by the fusion passes in kiln-passes:
//!
//! - `FusedMatMul(A[..., K], W[K, N], bias[N])`: one GEMM over all leading rows of A with the
//!   bias preloaded into the output (so the GEMM accumulates onto it) and the activation applied
//!   while the rows are hot.
//! - `FusedConv(X, W, B?)`: Conv (same attributes) followed by the activation.
//!
//! Both take `activation` (Relu, Sigmoid, Tanh, HardSwish, LeakyRelu, HardSigmoid, Gelu,
//! GeluTanh, Clip) and `activation_params` (alpha / alpha, beta / min, max).

use rayon::prelude::*;

use kiln_runtime::{DType, Error, Result, Tensor};

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;

use super::matmul::{sgemm, Mat};

pub fn register(r: &mut Registry) {
    r.add_in("kiln", "FusedMatMul", fused_matmul);
    r.add_in("kiln", "FusedConv", fused_conv);
}

/// An activation applied to f32 outputs in place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Act {
    None,
    Relu,
    Sigmoid,
    Tanh,
    HardSwish,
    LeakyRelu(f32),
    HardSigmoid(f32, f32),
    Gelu,
    GeluTanh,
    Clip(f32, f32),
}

impl Act {
    pub(crate) fn from_ctx(ctx: &OpCtx) -> Result<Act> {
        let p = ctx.attr_floats("activation_params").unwrap_or_default();
        let at = |i: usize, d: f32| p.get(i).copied().unwrap_or(d);
        Ok(match ctx.attr_s("activation", "").as_str() {
            "" => Act::None,
            "Relu" => Act::Relu,
            "Sigmoid" => Act::Sigmoid,
            "Tanh" => Act::Tanh,
            "HardSwish" => Act::HardSwish,
            "LeakyRelu" => Act::LeakyRelu(at(0, 0.01)),
            "HardSigmoid" => Act::HardSigmoid(at(0, 0.2), at(1, 0.5)),
            "Gelu" => Act::Gelu,
            "GeluTanh" => Act::GeluTanh,
            "Clip" => Act::Clip(at(0, f32::MIN), at(1, f32::MAX)),
            a => return Err(ctx.unsupported(format!("activation '{a}'"))),
        })
    }

    #[inline]
    fn one(self, x: f32) -> f32 {
        match self {
            Act::None => x,
            Act::Relu => x.max(0.0),
            Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Act::Tanh => x.tanh(),
            Act::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            Act::LeakyRelu(a) => {
                if x < 0.0 {
                    a * x
                } else {
                    x
                }
            }
            Act::HardSigmoid(a, b) => (a * x + b).clamp(0.0, 1.0),
            Act::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
            Act::GeluTanh => {
                let k = (2.0f32 / std::f32::consts::PI).sqrt();
                0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
            }
            // Clip propagates NaN like the standalone op (max/min would drop it).
            Act::Clip(lo, hi) => {
                if x < lo {
                    lo
                } else if x > hi {
                    hi
                } else {
                    x
                }
            }
        }
    }

    pub(crate) fn apply(self, v: &mut [f32]) {
        if self == Act::None {
            return;
        }
        if v.len() >= 1 << 15 {
            v.par_chunks_mut(1 << 13).for_each(|c| c.iter_mut().for_each(|x| *x = self.one(*x)));
        } else {
            v.iter_mut().for_each(|x| *x = self.one(*x));
        }
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
    let w = f32_input(ctx, inputs, 1)?;
    let act = Act::from_ctx(ctx)?;
    if a.rank() < 1 || w.rank() != 2 || a.shape()[a.rank() - 1] != w.shape()[0] {
        return Err(Error::Shape(format!("FusedMatMul: A {:?} · W {:?}", a.shape(), w.shape())));
    }
    let (k, n) = (w.shape()[0], w.shape()[1]);
    let m = a.len() / k.max(1);
    let mut out_shape = a.shape().to_vec();
    *out_shape.last_mut().unwrap() = n;
    let mut c = vec![0f32; m * n];
    let bias = match ctx.opt_input(inputs, 2) {
        Some(b) if b.dtype() == DType::F32 && b.len() == n => Some(b.view::<f32>()?),
        Some(b) => return Err(Error::Shape(format!("FusedMatMul: bias {:?} for {n} columns", b.shape()))),
        None => None,
    };
    if let Some(b) = bias {
        for row in c.chunks_mut(n.max(1)) {
            row.copy_from_slice(b);
        }
    }
    sgemm(m, n, k, Mat::rows(a.view::<f32>()?, k), Mat::rows(w.view::<f32>()?, n), bias.is_some(), &mut c, n, true)?;
    act.apply(&mut c);
    Ok(vec![Tensor::from_vec(&out_shape, c)?])
}

fn fused_conv(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let act = Act::from_ctx(ctx)?;
    let mut y = super::conv::conv(ctx, inputs)?.swap_remove(0);
    if act != Act::None {
        if y.dtype() != DType::F32 {
            return Err(Error::DType(format!("FusedConv activation on {} output", y.dtype())));
        }
        act.apply(y.view_mut::<f32>()?);
    }
    Ok(vec![y])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, Step};

    fn run(op: &str, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        let s = Step { op: op.into(), domain: "kiln".into(), opset: 1, attrs, outputs: vec![0], ..Default::default() };
        match crate::cpu::registry().get("kiln", op) {
            Some(crate::cpu::Kernel::Tensor(k)) => k(&OpCtx::new(&s, None), &inputs),
            _ => panic!("no kernel"),
        }
    }

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
        Act::HardSwish.apply(&mut v);
        assert_eq!(v, vec![-0., -0.5 * (2.5 / 6.0), 0., 0.5 * (3.5 / 6.0), 4.]);
        let mut v = vec![-2f32, 0., 7.];
        Act::Clip(0., 6.).apply(&mut v);
        assert_eq!(v, vec![0., 0., 6.]);
        let mut v = vec![1f32];
        Act::Gelu.apply(&mut v);
        assert!((v[0] - 0.841_344_7).abs() < 1e-6);
        let mut v = vec![-1f32];
        Act::LeakyRelu(0.1).apply(&mut v);
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
