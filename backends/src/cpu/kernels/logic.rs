//! Comparisons (Equal, Greater, Less, GreaterOrEqual, LessOrEqual) and boolean logic (And, Or,
//! Xor), all with multidirectional broadcasting and a bool output. Iteration is elementwise.rs's.

use kiln_runtime::{DType, Result, Tensor};

use super::elementwise::{map2, map2_into, same_dtype_pair, Plan};
use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;

/// A comparison kernel for numeric, bool and string operands (floats compare as IEEE: NaN is
/// unequal and unordered, -0 == +0).
macro_rules! compare_kernel {
    ($name:ident, $op:tt) => {
        fn $name(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
            let (a, b) = same_dtype_pair(ctx, inputs)?;
            let out = match a.dtype() {
                DType::String => {
                    let (shape, plan) = Plan::new([a.shape(), b.shape()])?;
                    let mut out = Tensor::zeros(DType::Bool, &shape);
                    let o = out.view_mut::<bool>()?;
                    map2_into(&plan, a.strings()?, b.strings()?, o, |x, y| x $op y);
                    out
                }
                DType::Bool => map2::<bool, bool, bool>(a, b, DType::Bool, |x, y| x $op y)?,
                dt => crate::with_numeric!(dt, T, {
                    map2::<T, T, bool>(a, b, DType::Bool, |x, y| x $op y)?
                }),
            };
            Ok(vec![out])
        }
    };
}
compare_kernel!(equal, ==);
compare_kernel!(greater, >);
compare_kernel!(less, <);
compare_kernel!(greater_or_equal, >=);
compare_kernel!(less_or_equal, <=);

macro_rules! logic_kernel {
    ($name:ident, $op:tt) => {
        fn $name(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
            let (a, b) = same_dtype_pair(ctx, inputs)?;
            Ok(vec![map2::<bool, bool, bool>(a, b, DType::Bool, |x, y| x $op y)?])
        }
    };
}
logic_kernel!(and, &);
logic_kernel!(or, |);
logic_kernel!(xor, ^);

pub fn register(r: &mut Registry) {
    r.add("Equal", equal);
    r.add("Greater", greater);
    r.add("Less", less);
    r.add("GreaterOrEqual", greater_or_equal);
    r.add("LessOrEqual", less_or_equal);
    r.add("And", and);
    r.add("Or", or);
    r.add("Xor", xor);
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::testing::*;
    use super::*;

    #[test]
    fn comparisons() {
        let a = || t(&[3], vec![1.0f32, f32::NAN, -0.0]);
        let b = || t(&[3], vec![1.0f32, f32::NAN, 0.0]);
        assert_eq!(run("Equal", 13, vec![], vec![a(), b()]).unwrap().view::<bool>().unwrap(), &[true, false, true]);
        let out = run("GreaterOrEqual", 16, vec![], vec![t(&[2, 1], vec![1u64, 5]), t(&[3], vec![0u64, 1, 9])]).unwrap();
        assert_eq!(out.shape(), &[2, 3]);
        assert_eq!(out.view::<bool>().unwrap(), &[true, true, false, true, true, false]);
        let out = run("Less", 13, vec![], vec![t(&[2], vec![-1i8, 3]), t(&[], vec![0i8])]).unwrap();
        assert_eq!(out.view::<bool>().unwrap(), &[true, false]);
        let s = |v: &[&str]| Some(Tensor::from_strings(&[v.len()], v.iter().map(|s| s.to_string()).collect()).unwrap());
        let out = run("Equal", 19, vec![], vec![s(&["string1", "string2"]), s(&["string1"])]).unwrap();
        assert_eq!(out.view::<bool>().unwrap(), &[true, false]);
        assert!(run("Equal", 13, vec![], vec![t(&[1], vec![1i32]), t(&[1], vec![1i64])]).is_err());
    }

    #[test]
    fn logic() {
        let a = || t(&[2, 2], vec![true, true, false, false]);
        let b = || t(&[2], vec![true, false]);
        assert_eq!(run("And", 7, vec![], vec![a(), b()]).unwrap().view::<bool>().unwrap(), &[true, false, false, false]);
        assert_eq!(run("Or", 7, vec![], vec![a(), b()]).unwrap().view::<bool>().unwrap(), &[true, true, true, false]);
        assert_eq!(run("Xor", 7, vec![], vec![a(), b()]).unwrap().view::<bool>().unwrap(), &[false, true, true, false]);
    }
}
