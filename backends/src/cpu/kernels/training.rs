//! Optimizer steps of the ai.onnx.preview.training domain: Adagrad, Adam, Momentum (standard and
//! Nesterov). Each takes the scalars R (learning rate) and T (update count), then n tensors to
//! optimize followed by their gradients and optimizer states, grouped by kind
//! ([X1..Xn, G1..Gn, V1..Vn, ...]); outputs are grouped the same way ([X1'..Xn', V1'..Vn', ...]).
//! Arithmetic is done in f64 and narrowed to each tensor's own dtype.

use kiln_runtime::{Error, Result, Tensor};

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{real_tensor, real_vec};

const DOMAIN: &str = "ai.onnx.preview.training";

pub fn register(r: &mut Registry) {
    r.add_in(DOMAIN, "Adagrad", adagrad);
    r.add_in(DOMAIN, "Adam", adam);
    r.add_in(DOMAIN, "Momentum", momentum);
}

/// A single-element tensor's value.
fn scalar(t: &Tensor, what: &str) -> Result<f64> {
    let v = t.to_f64_vec()?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => Err(Error::Shape(format!("{what} must hold one element, got shape {:?}", t.shape()))),
    }
}

/// The optimizer's inputs: R, T, and `kinds` groups of n tensors each (X, G, states...).
struct Groups<'a> {
    r: f64,
    t: i64,
    n: usize,
    rest: Vec<&'a Tensor>,
}

impl<'a> Groups<'a> {
    fn new(ctx: &OpCtx, inputs: &'a [Option<Tensor>], kinds: usize) -> Result<Groups<'a>> {
        let r = scalar(ctx.input(inputs, 0)?, "R")?;
        let t = scalar(ctx.input(inputs, 1)?, "T")? as i64;
        let rest = (2..inputs.len()).map(|i| ctx.input(inputs, i)).collect::<Result<Vec<_>>>()?;
        if rest.is_empty() || rest.len() % kinds != 0 {
            return Err(Error::Shape(format!(
                "{} expects 2 + {kinds}*n inputs, got {}",
                ctx.op(),
                inputs.len()
            )));
        }
        Ok(Groups { r, t, n: rest.len() / kinds, rest })
    }

    /// Tensor `i` of group `kind`, checked to have the shape of the i-th X.
    fn get(&self, kind: usize, i: usize) -> Result<&'a Tensor> {
        let t = self.rest[kind * self.n + i];
        let x = self.rest[i];
        if t.shape() != x.shape() {
            return Err(Error::Shape(format!(
                "optimizer input shapes differ: {:?} vs {:?}",
                t.shape(),
                x.shape()
            )));
        }
        Ok(t)
    }

    /// Group `kind`'s i-th tensor as f64 values.
    fn values(&self, kind: usize, i: usize) -> Result<Vec<f64>> {
        Ok(real_vec::<f64>(self.get(kind, i)?)?.into_owned())
    }

    /// A result laid out like group `kind`'s i-th tensor.
    fn output(&self, kind: usize, i: usize, v: Vec<f64>) -> Result<Tensor> {
        let like = self.get(kind, i)?;
        real_tensor::<f64>(like.dtype(), like.shape(), v)
    }
}

fn adagrad(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let g = Groups::new(ctx, inputs, 3)?;
    let eps = ctx.attr_f("epsilon", 1e-6) as f64;
    let decay = ctx.attr_f("decay_factor", 0.0) as f64;
    let norm = ctx.attr_f("norm_coefficient", 0.0) as f64;
    let rate = g.r / (1.0 + g.t as f64 * decay);
    let (mut xs, mut hs) = (Vec::with_capacity(g.n), Vec::with_capacity(g.n));
    for i in 0..g.n {
        let (mut x, grad, mut h) = (g.values(0, i)?, g.values(1, i)?, g.values(2, i)?);
        for ((x, &gr), h) in x.iter_mut().zip(&grad).zip(h.iter_mut()) {
            let gr = norm * *x + gr;
            *h += gr * gr;
            *x -= rate * gr / (h.sqrt() + eps);
        }
        xs.push(g.output(0, i, x)?);
        hs.push(g.output(2, i, h)?);
    }
    xs.extend(hs);
    Ok(xs)
}

fn adam(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let g = Groups::new(ctx, inputs, 4)?;
    let alpha = ctx.attr_f("alpha", 0.9) as f64;
    let beta = ctx.attr_f("beta", 0.999) as f64;
    let eps = ctx.attr_f("epsilon", 1e-6) as f64;
    let norm = ctx.attr_f("norm_coefficient", 0.0) as f64;
    let norm_post = ctx.attr_f("norm_coefficient_post", 0.0) as f64;
    // Bias correction of both moments applies from the first counted update on.
    let rate = if g.t > 0 {
        let t = g.t as i32;
        g.r * (1.0 - beta.powi(t)).sqrt() / (1.0 - alpha.powi(t))
    } else {
        g.r
    };
    let (mut xs, mut vs, mut hs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..g.n {
        let (mut x, grad) = (g.values(0, i)?, g.values(1, i)?);
        let (mut v, mut h) = (g.values(2, i)?, g.values(3, i)?);
        for (((x, &gr), v), h) in x.iter_mut().zip(&grad).zip(v.iter_mut()).zip(h.iter_mut()) {
            let gr = norm * *x + gr;
            *v = alpha * *v + (1.0 - alpha) * gr;
            *h = beta * *h + (1.0 - beta) * gr * gr;
            let stepped = *x - rate * (*v / (h.sqrt() + eps));
            *x = (1.0 - norm_post) * stepped;
        }
        xs.push(g.output(0, i, x)?);
        vs.push(g.output(2, i, v)?);
        hs.push(g.output(3, i, h)?);
    }
    xs.extend(vs);
    xs.extend(hs);
    Ok(xs)
}

fn momentum(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let g = Groups::new(ctx, inputs, 3)?;
    let req = |name: &str| {
        ctx.attr_f_opt(name)
            .map(|v| v as f64)
            .ok_or_else(|| Error::Other(format!("Momentum requires attribute {name}")))
    };
    let (alpha, beta, norm) = (req("alpha")?, req("beta")?, req("norm_coefficient")?);
    let nesterov = match ctx.attr_s("mode", "standard").as_str() {
        "standard" => false,
        "nesterov" => true,
        m => return Err(ctx.unsupported(format!("mode {m:?}"))),
    };
    // The gradient's coefficient is 1 on the very first update.
    let beta = if g.t > 0 { beta } else { 1.0 };
    let (mut xs, mut vs) = (Vec::with_capacity(g.n), Vec::with_capacity(g.n));
    for i in 0..g.n {
        let (mut x, grad, mut v) = (g.values(0, i)?, g.values(1, i)?, g.values(2, i)?);
        for ((x, &gr), v) in x.iter_mut().zip(&grad).zip(v.iter_mut()) {
            let gr = norm * *x + gr;
            *v = alpha * *v + beta * gr;
            *x -= if nesterov { g.r * (gr + alpha * *v) } else { g.r * *v };
        }
        xs.push(g.output(0, i, x)?);
        vs.push(g.output(2, i, v)?);
    }
    xs.extend(vs);
    Ok(xs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    fn float(name: &str, v: f32) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Float as i32, f: v, ..Default::default() }
    }

    fn run(op: &str, attrs: Vec<Attr>, tensors: Vec<Tensor>, nout: usize) -> Vec<Vec<f64>> {
        let step = Step {
            op: op.into(),
            domain: DOMAIN.into(),
            opset: 1,
            outputs: (0..nout as i32).collect(),
            attrs,
            ..Default::default()
        };
        let inputs: Vec<Option<Tensor>> = tensors.into_iter().map(Some).collect();
        let out = crate::cpu::eval_step(&step, &inputs).unwrap();
        out.iter().map(|t| t.to_f64_vec().unwrap()).collect()
    }

    fn rt(r: f64, t: i64) -> Vec<Tensor> {
        vec![Tensor::scalar(r), Tensor::scalar(t)]
    }

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_vec(&[v.len()], v.to_vec()).unwrap()
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn adagrad_one_step() {
        // r = 0.5 / (1 + 2*0.5) = 0.25; g = 0.5*1 + 1 = 1.5; h = 1 + 2.25 = 3.25.
        let mut ins = rt(0.5, 2);
        ins.extend([t(&[1.0]), t(&[1.0]), t(&[1.0])]);
        let out = run(
            "Adagrad",
            vec![float("decay_factor", 0.5), float("norm_coefficient", 0.5), float("epsilon", 0.0)],
            ins,
            2,
        );
        close(&out[0], &[1.0 - 0.25 * 1.5 / 3.25f64.sqrt()]);
        close(&out[1], &[3.25]);
    }

    #[test]
    fn adam_bias_corrected() {
        // alpha = beta = 0.5, t = 1: v = 0.5*0 + 0.5*2 = 1, h = 0.5*0 + 0.5*4 = 2,
        // rate = 1 * sqrt(0.5) / 0.5 = sqrt(2); x = 3 - sqrt(2) * 1/sqrt(2) = 2.
        let mut ins = rt(1.0, 1);
        ins.extend([t(&[3.0]), t(&[2.0]), t(&[0.0]), t(&[0.0])]);
        let out = run(
            "Adam",
            vec![float("alpha", 0.5), float("beta", 0.5), float("epsilon", 0.0)],
            ins,
            3,
        );
        close(&out[0], &[2.0]);
        close(&out[1], &[1.0]);
        close(&out[2], &[2.0]);
    }

    #[test]
    fn momentum_standard_and_nesterov_two_tensors() {
        let attrs = |mode: &str| {
            vec![
                float("alpha", 0.5),
                float("beta", 0.25),
                float("norm_coefficient", 0.0),
                Attr { name: "mode".into(), kind: AttrKind::String as i32, s: mode.into(), ..Default::default() },
            ]
        };
        let ins = || {
            let mut v = rt(0.1, 3);
            v.extend([t(&[1.0]), t(&[2.0]), t(&[4.0]), t(&[8.0]), t(&[2.0]), t(&[4.0])]);
            v
        };
        // v = 0.5*2 + 0.25*4 = 2 and 0.5*4 + 0.25*8 = 4.
        let out = run("Momentum", attrs("standard"), ins(), 4);
        close(&out[0], &[1.0 - 0.2]);
        close(&out[1], &[2.0 - 0.4]);
        close(&out[2], &[2.0]);
        close(&out[3], &[4.0]);
        // Nesterov: x -= r * (g + alpha * v).
        let out = run("Momentum", attrs("nesterov"), ins(), 4);
        close(&out[0], &[1.0 - 0.1 * (4.0 + 1.0)]);
        close(&out[1], &[2.0 - 0.1 * (8.0 + 2.0)]);
    }
}
