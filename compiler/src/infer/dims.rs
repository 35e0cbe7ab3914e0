//! Dimension algebra on symbolic dims: broadcasting, merging declared with inferred dims,
//! products (with symbol cancellation for Reshape's -1) and the small symbolic integer values that
//! shape computations (Shape → Gather → Concat → Reshape) carry.

use crate::ir::Dim;

/// Multidirectional (numpy) broadcasting of one dim pair; never fails, says Unknown instead.
pub(crate) fn broadcast_dim(a: &Dim, b: &Dim) -> Dim {
    use Dim::*;
    match (a, b) {
        (Fixed(1), d) | (d, Fixed(1)) => d.clone(),
        (Fixed(x), Fixed(y)) if x == y => Fixed(*x),
        (Fixed(_), Fixed(_)) => Unknown,
        // A valid model can only pair n (n != 1) with n or 1, so the result is n.
        (Fixed(n), _) | (_, Fixed(n)) => Fixed(*n),
        (Sym(x), Sym(y)) if x == y => Sym(x.clone()),
        _ => Unknown,
    }
}

/// Broadcast several shapes (right-aligned).
pub(crate) fn broadcast(shapes: &[&[Dim]]) -> Vec<Dim> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    (0..rank)
        .map(|i| {
            let mut acc = Dim::Fixed(1);
            for s in shapes {
                if i + s.len() >= rank {
                    acc = broadcast_dim(&acc, &s[i + s.len() - rank]);
                }
            }
            acc
        })
        .collect()
}

/// Two dims a valid model says are equal (Concat's other axes, MatMul's K): the most specific.
pub(crate) fn same_dim(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(_), _) => a.clone(),
        (_, Dim::Fixed(_)) => b.clone(),
        (Dim::Sym(_), _) => a.clone(),
        _ => b.clone(),
    }
}

/// Two dims that may legitimately differ (the branches of an If): kept only when equal.
pub(crate) fn join_dim(a: &Dim, b: &Dim) -> Dim {
    if a == b {
        a.clone()
    } else {
        Dim::Unknown
    }
}

/// A declared dim refined by an inferred one: fixed sizes win, then inferred symbols (they tie
/// the value to the graph inputs' symbols, where exporters declare intermediate values with
/// made-up names like `Concat461_dim_0`), then declared ones.
pub(crate) fn refine_dim(declared: &Dim, inferred: &Dim) -> Dim {
    match (declared, inferred) {
        (Dim::Fixed(_), _) => declared.clone(),
        (_, Dim::Fixed(_) | Dim::Sym(_)) => inferred.clone(),
        _ => declared.clone(),
    }
}

/// A product of dims kept as coefficient × symbols, so that symbols can cancel.
#[derive(Clone, Debug, Default)]
pub(crate) struct Product {
    pub coef: u128,
    pub syms: Vec<String>,
    pub unknown: bool,
}

pub(crate) fn product(dims: &[Dim]) -> Product {
    let mut p = Product {
        coef: 1,
        syms: Vec::new(),
        unknown: false,
    };
    for d in dims {
        match d {
            Dim::Fixed(n) => p.coef = p.coef.saturating_mul(*n as u128),
            Dim::Sym(s) => p.syms.push(s.clone()),
            Dim::Unknown => p.unknown = true,
        }
    }
    p.syms.sort();
    p
}

impl Product {
    /// The product as a single dim when it is one (a size, or exactly one symbol times 1).
    pub fn to_dim(&self) -> Dim {
        if self.coef == 0 {
            return Dim::Fixed(0);
        }
        if self.unknown {
            return Dim::Unknown;
        }
        match (self.syms.len(), self.coef) {
            (0, c) => usize::try_from(c).map(Dim::Fixed).unwrap_or(Dim::Unknown),
            (1, 1) => Dim::Sym(self.syms[0].clone()),
            _ => Dim::Unknown,
        }
    }

    /// `self / other` when it is a whole single dim.
    pub fn div(&self, other: &Product) -> Dim {
        if self.unknown || other.unknown || other.coef == 0 {
            return Dim::Unknown;
        }
        let mut rest = self.syms.clone();
        for s in &other.syms {
            match rest.iter().position(|r| r == s) {
                Some(i) => {
                    rest.remove(i);
                }
                None => return Dim::Unknown,
            }
        }
        if !self.coef.is_multiple_of(other.coef) {
            return Dim::Unknown;
        }
        Product {
            coef: self.coef / other.coef,
            syms: rest,
            unknown: false,
        }
        .to_dim()
    }
}

pub(crate) fn prod_dim(dims: &[Dim]) -> Dim {
    product(dims).to_dim()
}

pub(crate) fn fixed(d: &Dim) -> Option<usize> {
    match d {
        Dim::Fixed(n) => Some(*n),
        _ => None,
    }
}

/// Apply `f` to a fixed dim; symbolic or unknown dims become Unknown.
pub(crate) fn map_fixed(d: &Dim, f: impl FnOnce(i64) -> i64) -> Dim {
    match d {
        Dim::Fixed(n) => {
            let v = f(*n as i64);
            if v >= 0 {
                Dim::Fixed(v as usize)
            } else {
                Dim::Unknown
            }
        }
        _ => Dim::Unknown,
    }
}

/// Sum of dims along a concatenation axis.
pub(crate) fn sum_dims(dims: &[&Dim]) -> Dim {
    let mut total = 0usize;
    let mut sym: Option<&Dim> = None;
    for d in dims {
        match d {
            Dim::Fixed(n) => total += n,
            Dim::Sym(_) if sym.is_none() => sym = Some(d),
            _ => return Dim::Unknown,
        }
    }
    match sym {
        None => Dim::Fixed(total),
        Some(s) if total == 0 => (*s).clone(),
        Some(_) => Dim::Unknown,
    }
}

/// Normalise a possibly negative axis against `rank`.
pub(crate) fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

/// One element of a small integer tensor known at compile time, possibly symbolic
/// (what `Shape(x)[i]` evaluates to).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum SymInt {
    Int(i64),
    Sym(String),
    Unknown,
}

impl SymInt {
    pub fn from_dim(d: &Dim) -> SymInt {
        match d {
            Dim::Fixed(n) => SymInt::Int(*n as i64),
            Dim::Sym(s) => SymInt::Sym(s.clone()),
            Dim::Unknown => SymInt::Unknown,
        }
    }

    pub fn to_dim(&self) -> Dim {
        match self {
            SymInt::Int(n) if *n >= 0 => Dim::Fixed(*n as usize),
            SymInt::Sym(s) => Dim::Sym(s.clone()),
            _ => Dim::Unknown,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            SymInt::Int(n) => Some(*n),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Dim {
        Dim::Sym(x.into())
    }

    #[test]
    fn broadcasting_symbols() {
        let a = [s("b"), Dim::Fixed(1), Dim::Fixed(4)];
        let b = [Dim::Fixed(3), Dim::Fixed(4)];
        assert_eq!(
            broadcast(&[&a, &b]),
            vec![s("b"), Dim::Fixed(3), Dim::Fixed(4)]
        );
        assert_eq!(broadcast_dim(&s("b"), &s("b")), s("b"));
        assert_eq!(broadcast_dim(&s("b"), &s("c")), Dim::Unknown);
        assert_eq!(broadcast_dim(&s("b"), &Dim::Fixed(5)), Dim::Fixed(5));
        assert_eq!(broadcast_dim(&Dim::Unknown, &Dim::Fixed(1)), Dim::Unknown);
    }

    #[test]
    fn product_division_cancels_symbols() {
        let inp = product(&[s("b"), s("s"), Dim::Fixed(384)]);
        let out = product(&[s("b"), s("s"), Dim::Fixed(12)]);
        assert_eq!(inp.div(&out), Dim::Fixed(32));
        let out2 = product(&[Dim::Fixed(384)]);
        assert_eq!(inp.div(&out2), Dim::Unknown);
        let out3 = product(&[s("s"), Dim::Fixed(384)]);
        assert_eq!(inp.div(&out3), s("b"));
    }
}
