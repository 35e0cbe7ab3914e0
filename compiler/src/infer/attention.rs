//! Output type of `kiln.Attention` (the fused softmax(scale·Q·Kᵀ + mask)·V): Q's dtype, and the
//! logical [B, H, Sq, Dv] shape (inputs read through their `*_perm`) stored through `out_perm`.

use crate::ir::{AttrValue, Dim, Type};

use super::dims::broadcast_dim;
use super::{tensor_type, Cx};

/// Types of a kiln-domain node this module knows, None for any other node.
pub(crate) fn infer(cx: &Cx) -> Option<Vec<Type>> {
    (cx.node.domain == "kiln" && cx.op() == "Attention").then(|| vec![tensor_type(cx.dtype(0), shape(cx))])
}

fn perm(cx: &Cx, name: &str) -> Option<[usize; 4]> {
    let p: &[i64] = match cx.attr(name) {
        Some(AttrValue::Ints(p)) => p.as_slice(),
        Some(_) => return None,
        None => &[0, 1, 2, 3],
    };
    let mut out = [0usize; 4];
    let mut seen = [false; 4];
    if p.len() != 4 {
        return None;
    }
    for (o, &a) in out.iter_mut().zip(p) {
        let a = usize::try_from(a).ok().filter(|&a| a < 4 && !seen[a])?;
        seen[a] = true;
        *o = a;
    }
    Some(out)
}

/// Input `i`'s logical dims.
fn logical(cx: &Cx, i: usize, name: &str) -> Option<[Dim; 4]> {
    let s = cx.shape(i).filter(|s| s.len() == 4)?;
    let p = perm(cx, name)?;
    Some(p.map(|a| s[a].clone()))
}

fn shape(cx: &Cx) -> Option<Vec<Dim>> {
    let q = logical(cx, 0, "q_perm")?;
    let k = logical(cx, 1, "k_perm")?;
    let v = logical(cx, 2, "v_perm")?;
    let batch = |i: usize| broadcast_dim(&broadcast_dim(&q[i], &k[i]), &v[i]);
    let out = [batch(0), batch(1), q[2].clone(), v[3].clone()];
    Some(perm(cx, "out_perm")?.iter().map(|&a| out[a].clone()).collect())
}
