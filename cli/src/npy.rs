//! .npy reading and writing (format versions 1.0–3.0, little-endian, C or Fortran order).
//!
//! numpy has no bfloat16, float8, float4 or 4-bit/2-bit integer types, so on write those are
//! widened: the float kinds to float32, int4/uint4/int2/uint2 to int8/uint8. Strings are numpy
//! unicode (`<U`) arrays.

use std::path::Path;

use kiln_runtime::manifest::{Attr, AttrKind, Step};
use kiln_runtime::{DType, Error, Result, Tensor};

const MAGIC: &[u8] = b"\x93NUMPY";

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {msg}", path.display()))
}

/// Value of `key` in the header dict, as raw text up to the next top-level comma or brace.
fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("'{key}'");
    let start = header.find(&pat)? + pat.len();
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    if rest.starts_with('(') {
        let end = rest.find(')')?;
        return Some(&rest[..=end]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

fn parse_descr(descr: &str) -> Option<(DType, usize)> {
    let d = descr.trim_matches(|c| c == '\'' || c == '"');
    let (order, code) = d.split_at(1);
    if order == ">" && !code.ends_with('1') {
        return None; // big-endian data is not supported
    }
    Some(match code {
        "f4" => (DType::F32, 4),
        "f8" => (DType::F64, 8),
        "f2" => (DType::F16, 2),
        "i1" => (DType::I8, 1),
        "u1" => (DType::U8, 1),
        "i2" => (DType::I16, 2),
        "u2" => (DType::U16, 2),
        "i4" => (DType::I32, 4),
        "u4" => (DType::U32, 4),
        "i8" => (DType::I64, 8),
        "u8" => (DType::U64, 8),
        "b1" => (DType::Bool, 1),
        c if c.starts_with('U') => (DType::String, 4 * c[1..].parse::<usize>().ok()?),
        c if c.starts_with('S') => (DType::String, c[1..].parse::<usize>().ok()?),
        _ => return None,
    })
}

pub fn read(path: &Path) -> Result<Tensor> {
    let data = std::fs::read(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
    parse(&data).map_err(|m| bad(path, m))
}

pub fn parse(data: &[u8]) -> std::result::Result<Tensor, String> {
    if data.len() < 10 || &data[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = data[6];
    let (hlen, hstart) = match major {
        1 => (u16::from_le_bytes([data[8], data[9]]) as usize, 10usize),
        2 | 3 => {
            if data.len() < 12 {
                return Err("truncated header".into());
            }
            (u32::from_le_bytes(data[8..12].try_into().unwrap()) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let body = hstart.checked_add(hlen).filter(|&e| e <= data.len()).ok_or("truncated header")?;
    let header = std::str::from_utf8(&data[hstart..body]).map_err(|_| "header is not text")?;
    let descr = header_field(header, "descr").ok_or("header has no descr")?;
    let (dtype, isz) = parse_descr(descr).ok_or_else(|| format!("unsupported dtype {descr}"))?;
    let fortran = header_field(header, "fortran_order").ok_or("header has no fortran_order")?;
    let fortran = fortran.starts_with("True");
    let shape_txt = header_field(header, "shape").ok_or("header has no shape")?;
    let shape: Vec<usize> = shape_txt
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape_txt}")))
        .collect::<std::result::Result<_, _>>()?;
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    let payload = &data[body..];
    if payload.len() < n.checked_mul(isz).ok_or("size overflows")? {
        return Err(format!("data holds {} bytes, shape {shape:?} needs {}", payload.len(), n * isz));
    }
    let payload = &payload[..n * isz];
    // Fortran order: the data is the C-order array of the reversed shape, transposed.
    let c_shape: Vec<usize> = if fortran { shape.iter().rev().copied().collect() } else { shape.clone() };
    let t = if dtype == DType::String {
        let unicode = descr.contains('U');
        let strings = payload
            .chunks(isz.max(1))
            .take(n)
            .map(|c| {
                if unicode {
                    let s: String = c
                        .chunks(4)
                        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                        .take_while(|&u| u != 0)
                        .map(|u| char::from_u32(u).unwrap_or('\u{fffd}'))
                        .collect();
                    s
                } else {
                    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                    String::from_utf8_lossy(&c[..end]).into_owned()
                }
            })
            .collect();
        Tensor::from_strings(&c_shape, strings)
    } else {
        if dtype == DType::Bool && payload.iter().any(|&b| b > 1) {
            return Err("bool array holds values other than 0/1".into());
        }
        Tensor::from_bytes(dtype, &c_shape, payload)
    }
    .map_err(|e| e.to_string())?;
    if fortran && shape.len() > 1 {
        let perm: Vec<i64> = (0..shape.len() as i64).rev().collect();
        let step = Step {
            op: "Transpose".into(),
            opset: 13,
            attrs: vec![Attr { name: "perm".into(), kind: AttrKind::Ints as i32, ints: perm, ..Default::default() }],
            ..Default::default()
        };
        let out = kiln_backends::cpu::eval_step(&step, &[Some(t)]).map_err(|e| e.to_string())?;
        return Ok(out.into_iter().next().ok_or("transpose failed")?);
    }
    Ok(t)
}

/// Cast `t` to `to` with the CPU backend's Cast kernel (the one definition of ONNX conversions).
pub fn cast(t: &Tensor, to: DType) -> Result<Tensor> {
    let step = Step {
        op: "Cast".into(),
        opset: 21,
        attrs: vec![Attr { name: "to".into(), kind: AttrKind::Int as i32, i: to.onnx_code() as i64, ..Default::default() }],
        ..Default::default()
    };
    let out = kiln_backends::cpu::eval_step(&step, &[Some(t.clone())])?;
    out.into_iter().next().ok_or_else(|| Error::Other("Cast produced no output".into()))
}

/// The dtype an output is written as (numpy lacks some).
pub fn numpy_dtype(d: DType) -> DType {
    match d {
        DType::BF16 | DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ
        | DType::F4E2M1 | DType::F8E8M0 => DType::F32,
        DType::I4 | DType::I2 => DType::I8,
        DType::U4 | DType::U2 => DType::U8,
        d => d,
    }
}

fn descr(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::F16 => "<f2",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::I16 => "<i2",
        DType::U16 => "<u2",
        DType::I32 => "<i4",
        DType::U32 => "<u4",
        DType::I64 => "<i8",
        DType::U64 => "<u8",
        DType::Bool => "|b1",
        _ => return None,
    })
}

/// Serialise to .npy bytes, widening types numpy lacks.
pub fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let target = numpy_dtype(t.dtype());
    let t = if target != t.dtype() {
        match t.dtype() {
            // int4/uint4/int2/uint2 are stored unpacked, one per byte: only the dtype tag changes.
            DType::I4 | DType::U4 | DType::I2 | DType::U2 => {
                Tensor::from_bytes(target, t.shape(), t.bytes())?
            }
            _ => cast(t, target)?,
        }
    } else {
        t.clone()
    };
    let (d, payload): (String, Vec<u8>) = if t.dtype() == DType::String {
        let s = t.strings()?;
        let width = s.iter().map(|x| x.chars().count()).max().unwrap_or(0).max(1);
        let mut p = Vec::with_capacity(s.len() * width * 4);
        for x in s {
            let mut k = 0;
            for c in x.chars() {
                p.extend_from_slice(&(c as u32).to_le_bytes());
                k += 1;
            }
            p.resize(p.len() + (width - k) * 4, 0);
        }
        (format!("<U{width}"), p)
    } else {
        let d = descr(t.dtype())
            .ok_or_else(|| Error::DType(format!("{} cannot be written as .npy", t.dtype())))?;
        (d.to_string(), t.bytes().to_vec())
    };
    let shape = match t.shape() {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        s => format!("({})", s.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{d}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that data starts on a 64-byte boundary, header ends with a newline.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat(total.div_ceil(64) * 64 - total));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Write atomically (temp file in the same folder, then rename).
pub fn write(path: &Path, t: &Tensor) -> Result<()> {
    crate::fsutil::write_atomic(path, &to_bytes(t)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_strings() {
        let t = Tensor::from_vec(&[2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let back = parse(&to_bytes(&t).unwrap()).unwrap();
        assert_eq!(back.shape(), &[2, 3]);
        assert_eq!(back.view::<f32>().unwrap(), t.view::<f32>().unwrap());
        let s = Tensor::from_strings(&[2], vec!["héllo".into(), "x".into()]).unwrap();
        let back = parse(&to_bytes(&s).unwrap()).unwrap();
        assert_eq!(back.strings().unwrap(), s.strings().unwrap());
    }

    #[test]
    fn scalar_and_bad_input() {
        let t = Tensor::scalar(7i64);
        let back = parse(&to_bytes(&t).unwrap()).unwrap();
        assert_eq!(back.shape(), &[] as &[usize]);
        assert_eq!(back.item::<i64>().unwrap(), 7);
        assert!(parse(b"garbage").is_err());
        let mut trunc = to_bytes(&Tensor::from_vec(&[100], vec![0f64; 100]).unwrap()).unwrap();
        trunc.truncate(200);
        assert!(parse(&trunc).is_err());
    }

    #[test]
    fn sub_byte_ints_widen_to_bytes() {
        let t = Tensor::from_slice_as(DType::I2, &[4], &[-2i8, -1, 0, 1]).unwrap();
        let back = parse(&to_bytes(&t).unwrap()).unwrap();
        assert_eq!((back.dtype(), back.view::<i8>().unwrap()), (DType::I8, &[-2i8, -1, 0, 1][..]));
        let t = Tensor::from_slice_as(DType::U2, &[3], &[3u8, 0, 2]).unwrap();
        let back = parse(&to_bytes(&t).unwrap()).unwrap();
        assert_eq!((back.dtype(), back.view::<u8>().unwrap()), (DType::U8, &[3u8, 0, 2][..]));
    }
}
