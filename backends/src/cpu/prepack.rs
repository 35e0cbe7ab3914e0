//! Load-time relayout of prepacked GEMM weights.
//!
//! The compiler's `prepack` pass stores the constant B of a `kiln.FusedMatMul` as packed panels
//! for the compile target's kernels (attribute `packed_b`). When the running kernels want another
//! panel width (another machine, or a `KILN_ISA` override), those constants are repacked here,
//! once per load, instead of on every call.

use kiln_runtime::manifest::Program;
use kiln_runtime::{DType, Error, Result, Tensor};

use super::gemm::{self, PackedB, PackedView};
use super::isa;

/// Repack, for the active ISA, every packed FusedMatMul weight among `consts` (value id, tensor)
/// that was packed for other kernels. Invalid packed bytes are an error.
pub(crate) fn relayout_for_active(prog: &Program, consts: &mut [(usize, Tensor)]) -> Result<()> {
    let isa = isa::active();
    let want_nr = gemm::nr_for(isa);
    for s in &prog.steps {
        let packed = s.domain == "kiln"
            && s.op == "FusedMatMul"
            && s.attrs.iter().any(|a| a.name == "packed_b" && a.i != 0);
        let Some(&w) = s.inputs.get(1).filter(|_| packed) else { continue };
        let Some((_, t)) = consts.iter_mut().find(|(v, _)| w >= 0 && *v == w as usize) else { continue };
        if t.dtype() != DType::U8 {
            return Err(Error::InvalidArtifact(format!("packed weight of {} is {}", s.name, t.dtype())));
        }
        let bytes = t.view::<u8>()?;
        let relaid = match PackedView::from_bytes(bytes)? {
            Some(v) if v.nr() == want_nr => continue,
            Some(v) => v.repack(isa),
            None => {
                let p = PackedB::from_bytes(bytes)?;
                if p.nr() == want_nr {
                    continue;
                }
                p.repack(isa)
            }
        };
        let bytes = relaid.as_bytes();
        *t = Tensor::from_bytes(DType::U8, &[bytes.len()], bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kiln_runtime::manifest::{Attr, Step};

    use super::*;
    use crate::cpu::ctx::OpCtx;
    use crate::cpu::gemm::MatRef;
    use crate::cpu::isa::Isa;

    fn fill(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(7);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn step(packed: Option<(usize, usize)>) -> Step {
        let mut attrs = vec![Attr { name: "activation".into(), s: b"Relu".to_vec(), ..Default::default() }];
        if let Some((k, n)) = packed {
            attrs.push(Attr { name: "packed_b".into(), i: 1, ..Default::default() });
            attrs.push(Attr { name: "b_shape".into(), ints: vec![k as i64, n as i64], ..Default::default() });
        }
        Step {
            op: "FusedMatMul".into(),
            domain: "kiln".into(),
            opset: 1,
            name: "fmm".into(),
            inputs: vec![0, 1, 2],
            outputs: vec![3],
            attrs,
        }
    }

    fn run(s: &Step, inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        match crate::cpu::registry().get("kiln", "FusedMatMul") {
            Some(crate::cpu::Kernel::Tensor(k)) => k(&OpCtx::new(s, None), &inputs),
            _ => panic!("no kernel"),
        }
    }

    fn packed_tensor(isa: Isa, w: &[f32], k: usize, n: usize) -> Tensor {
        let p = PackedB::new(isa, MatRef::rows(w, n), k, n).unwrap();
        Tensor::from_bytes(DType::U8, &[p.as_bytes().len()], p.as_bytes()).unwrap()
    }

    #[test]
    fn packed_weights_give_the_unpacked_result() {
        // Several row counts: the skinny path (m ≤ 4) and the tiled one read packed panels.
        for m in [1, 3, 16, 37] {
            let (k, n) = (45, 70);
            let a = Tensor::from_vec(&[m, k], fill(m * k, 1)).unwrap();
            let wv = fill(k * n, 2);
            let w = Tensor::from_vec(&[k, n], wv.clone()).unwrap();
            let bias = Tensor::from_vec(&[n], fill(n, 3)).unwrap();
            let want = run(&step(None), vec![Some(a.clone()), Some(w), Some(bias.clone())]).unwrap();
            // Packed for every ISA: the active one is read in place, the others relaid.
            for isa in Isa::ALL {
                let pw = packed_tensor(isa, &wv, k, n);
                let got = run(&step(Some((k, n))), vec![Some(a.clone()), Some(pw), Some(bias.clone())]).unwrap();
                assert_eq!(got[0].shape(), want[0].shape());
                for (x, y) in got[0].view::<f32>().unwrap().iter().zip(want[0].view::<f32>().unwrap()) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{isa} m={m}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn mismatched_isa_is_relaid_once_at_load() {
        let (k, n) = (33, 50);
        let wv = fill(k * n, 4);
        let mut prog = Program::default();
        prog.steps.push(step(Some((k, n))));
        let mut consts = vec![(1usize, packed_tensor(Isa::Scalar, &wv, k, n))];
        relayout_for_active(&prog, &mut consts).unwrap();
        let v = PackedView::from_bytes(consts[0].1.view::<u8>().unwrap()).unwrap().unwrap();
        assert_eq!(v.nr(), gemm::nr_for(isa::active()));
        for (p, j) in [(0, 0), (32, 49), (7, 33)] {
            assert_eq!(v.get(p, j), wv[p * n + j]);
        }
        // Already right: left as it is (same buffer).
        let before = consts[0].1.view::<u8>().unwrap().as_ptr();
        relayout_for_active(&prog, &mut consts).unwrap();
        assert_eq!(consts[0].1.view::<u8>().unwrap().as_ptr(), before);
    }

    #[test]
    fn corrupt_packed_weights_are_errors() {
        let (k, n) = (8, 9);
        let good = packed_tensor(isa::active(), &fill(k * n, 5), k, n);
        let bytes = good.view::<u8>().unwrap().to_vec();
        let a = Tensor::from_vec(&[2, k], fill(2 * k, 6)).unwrap();
        let mut truncated = bytes.clone();
        truncated.truncate(bytes.len() - 4);
        let mut bad_magic = bytes.clone();
        bad_magic[1] ^= 0x55;
        let mut huge_n = bytes.clone();
        huge_n[31] = 0x7f;
        for b in [truncated, bad_magic, huge_n] {
            let t = Tensor::from_bytes(DType::U8, &[b.len()], &b).unwrap();
            assert!(run(&step(Some((k, n))), vec![Some(a.clone()), Some(t.clone()), None]).is_err());
            let mut prog = Program::default();
            prog.steps.push(step(Some((k, n))));
            assert!(relayout_for_active(&prog, &mut [(1, t)]).is_err());
        }
        // Valid bytes but a b_shape that disagrees with them; a missing b_shape; f32 weights.
        assert!(run(&step(Some((k, n + 1))), vec![Some(a.clone()), Some(good.clone()), None]).is_err());
        let mut s = step(Some((k, n)));
        s.attrs.retain(|a| a.name != "b_shape");
        assert!(run(&s, vec![Some(a.clone()), Some(good), None]).is_err());
        let wf = Tensor::from_vec(&[k, n], fill(k * n, 7)).unwrap();
        assert!(run(&step(Some((k, n))), vec![Some(a), Some(wf), None]).is_err());
    }
}
