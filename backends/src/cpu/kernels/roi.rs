//! RoiAlign (opsets 10, 16, 22): bilinear sampling of each region of interest into a fixed
//! output_height x output_width grid, averaged or maxed over the samples of each bin.
//!
//! The sampling positions and bilinear weights of a ROI depend only on its geometry, so they are
//! computed once per ROI and shared by every channel. Max mode follows the reference
//! implementation exactly: each sample contributes the largest of its four *weighted* corner
//! values (not the interpolated value), and the bin takes the largest such contribution.

use kiln_runtime::{Error, Result, Tensor};

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{real_tensor, real_vec, Real};
use crate::with_real;

pub fn register(r: &mut Registry) {
    r.add("RoiAlign", roi_align);
}

/// One bilinear sample: four flat positions in an H*W plane and their weights.
#[derive(Clone, Copy)]
struct Sample<R> {
    pos: [usize; 4],
    w: [R; 4],
}

struct Params {
    avg: bool,
    out_h: usize,
    out_w: usize,
    sampling_ratio: i64,
    spatial_scale: f64,
    half_pixel: bool,
}

fn params(ctx: &OpCtx) -> Result<Params> {
    let avg = match ctx.attr_s("mode", "avg").to_ascii_lowercase().as_str() {
        "avg" => true,
        "max" => false,
        m => return Err(ctx.unsupported(format!("mode {m:?}"))),
    };
    // Opset 10 had no attribute and behaved like output_half_pixel; 16 made half_pixel the default.
    let default_ctm = if ctx.opset() >= 16 { "half_pixel" } else { "output_half_pixel" };
    let half_pixel = match ctx.attr_s("coordinate_transformation_mode", default_ctm).as_str() {
        "half_pixel" => true,
        "output_half_pixel" => false,
        m => return Err(ctx.unsupported(format!("coordinate_transformation_mode {m:?}"))),
    };
    let dim = |name: &str| -> Result<usize> {
        let v = ctx.attr_i(name, 1);
        if v < 1 {
            return Err(Error::Shape(format!("RoiAlign {name} must be positive, got {v}")));
        }
        Ok(v as usize)
    };
    Ok(Params {
        avg,
        out_h: dim("output_height")?,
        out_w: dim("output_width")?,
        sampling_ratio: ctx.attr_i("sampling_ratio", 0),
        spatial_scale: ctx.attr_f("spatial_scale", 1.0) as f64,
        half_pixel,
    })
}

/// The bilinear sample at (y, x) of an h*w plane; all-zero weights outside the plane's margin.
fn bilinear<R: Real>(y: R, x: R, h: usize, w: usize) -> Sample<R> {
    let outside = |v: R, n: usize| v < R::from_f64(-1.0) || v > R::from_usize(n);
    if outside(y, h) || outside(x, w) {
        return Sample { pos: [0; 4], w: [R::ZERO; 4] };
    }
    // One axis: (low index, high index, fraction towards high).
    let axis = |v: R, n: usize| -> (usize, usize, R) {
        let v = if v < R::ZERO { R::ZERO } else { v };
        let low = v.to_f64() as usize;
        if low >= n - 1 {
            (n - 1, n - 1, R::ZERO)
        } else {
            (low, low + 1, v - R::from_usize(low))
        }
    };
    let (y0, y1, ly) = axis(y, h);
    let (x0, x1, lx) = axis(x, w);
    let (hy, hx) = (R::ONE - ly, R::ONE - lx);
    Sample {
        pos: [y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1],
        w: [hy * hx, hy * lx, ly * hx, ly * lx],
    }
}

/// Samples of one ROI, bin by bin (row-major over the output grid), plus the per-bin sample
/// count. Geometry is computed in the tensor's own precision, as the reference does: the
/// adaptive grid size (a ceil) is sensitive to it.
fn roi_samples<R: Real>(p: &Params, roi: &[R], h: usize, w: usize) -> (Vec<Sample<R>>, usize) {
    let offset = R::from_f64(if p.half_pixel { 0.5 } else { 0.0 });
    let scale = R::from_f64(p.spatial_scale);
    let [start_w, start_h, end_w, end_h] = [0, 1, 2, 3].map(|i| roi[i] * scale - offset);
    let (mut roi_w, mut roi_h) = (end_w - start_w, end_h - start_h);
    if !p.half_pixel {
        // Malformed ROIs are forced to 1x1.
        roi_w = if roi_w < R::ONE { R::ONE } else { roi_w };
        roi_h = if roi_h < R::ONE { R::ONE } else { roi_h };
    }
    let bin_h = roi_h / R::from_usize(p.out_h);
    let bin_w = roi_w / R::from_usize(p.out_w);
    let grid = |bin: R| -> usize {
        if p.sampling_ratio > 0 {
            p.sampling_ratio as usize
        } else {
            bin.to_f64().ceil().max(0.0) as usize
        }
    };
    let (gh, gw) = (grid(bin_h), grid(bin_w));
    let (rgh, rgw, half) = (R::from_usize(gh), R::from_usize(gw), R::from_f64(0.5));
    let mut samples = Vec::with_capacity(p.out_h * p.out_w * gh * gw);
    for ph in 0..p.out_h {
        for pw in 0..p.out_w {
            for iy in 0..gh {
                let y = start_h + R::from_usize(ph) * bin_h + (R::from_usize(iy) + half) * bin_h / rgh;
                for ix in 0..gw {
                    let x = start_w + R::from_usize(pw) * bin_w + (R::from_usize(ix) + half) * bin_w / rgw;
                    samples.push(bilinear(y, x, h, w));
                }
            }
        }
    }
    (samples, gh * gw)
}

/// Pool one channel plane of one ROI into `out` (one value per bin).
fn pool_plane<R: Real>(plane: &[R], samples: &[Sample<R>], per_bin: usize, avg: bool, out: &mut [R]) {
    let count = R::from_usize(per_bin.max(1));
    for (bin, o) in out.iter_mut().enumerate() {
        let bin_samples = &samples[bin * per_bin..(bin + 1) * per_bin];
        let weighted = |s: &Sample<R>, k: usize| s.w[k] * plane[s.pos[k]];
        *o = if avg {
            let mut sum = R::ZERO;
            for s in bin_samples {
                sum += weighted(s, 0) + weighted(s, 1) + weighted(s, 2) + weighted(s, 3);
            }
            sum / count
        } else {
            let corner_max = |s: &Sample<R>| {
                (1..4).map(|k| weighted(s, k)).fold(weighted(s, 0), |m, v| if v > m { v } else { m })
            };
            bin_samples.iter().map(corner_max).reduce(|m, v| if v > m { v } else { m }).unwrap_or(R::ZERO)
        };
    }
}

fn roi_align(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let rois = ctx.input(inputs, 1)?;
    let batch = ctx.input(inputs, 2)?.to_i64_vec()?;
    let p = params(ctx)?;
    let &[n, c, h, w] = x.shape() else {
        return Err(Error::Shape(format!("RoiAlign expects X of rank 4, got {:?}", x.shape())));
    };
    let num_rois = batch.len();
    if rois.shape() != [num_rois, 4] {
        return Err(Error::Shape(format!(
            "RoiAlign rois shape {:?} does not match {num_rois} batch indices",
            rois.shape()
        )));
    }
    if let Some(&b) = batch.iter().find(|&&b| b < 0 || b as usize >= n) {
        return Err(Error::Shape(format!("RoiAlign batch index {b} is out of range for batch {n}")));
    }
    let out_shape = [num_rois, c, p.out_h, p.out_w];
    if h == 0 || w == 0 || num_rois * c == 0 {
        return Ok(vec![Tensor::zeros(x.dtype(), &out_shape)]);
    }
    with_real!(x.dtype(), R, {
        let boxes = real_vec::<R>(rois)?;
        let data = real_vec::<R>(x)?;
        let plane = h * w;
        let bins = p.out_h * p.out_w;
        let mut out = vec![R::ZERO; num_rois * c * bins];
        crate::cpu::par::chunks_mut(&mut out, c * bins, |r, roi_out| {
            let (samples, per_bin) = roi_samples(&p, &boxes[r * 4..r * 4 + 4], h, w);
            let base = batch[r] as usize * c * plane;
            for (ch, o) in roi_out.chunks_mut(bins).enumerate() {
                let src = &data[base + ch * plane..base + (ch + 1) * plane];
                pool_plane(src, &samples, per_bin, p.avg, o);
            }
        });
        Ok(vec![real_tensor(x.dtype(), &out_shape, out)?])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    fn run(opset: i64, attrs: Vec<Attr>, x: Tensor, rois: Vec<f32>) -> Tensor {
        let k = rois.len() / 4;
        let step = Step { op: "RoiAlign".into(), opset, outputs: vec![0], attrs, ..Default::default() };
        let ins = [
            Some(x),
            Some(Tensor::from_vec(&[k, 4], rois).unwrap()),
            Some(Tensor::from_vec(&[k], vec![0i64; k]).unwrap()),
        ];
        crate::cpu::eval_step(&step, &ins).unwrap().remove(0)
    }

    fn int(name: &str, v: i64) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Int as i32, i: v, ..Default::default() }
    }

    fn s(name: &str, v: &str) -> Attr {
        Attr { name: name.into(), kind: AttrKind::String as i32, s: v.into(), ..Default::default() }
    }

    fn plane() -> Tensor {
        // 2x2 plane [[0, 1], [2, 3]].
        Tensor::from_vec(&[1, 1, 2, 2], vec![0f32, 1., 2., 3.]).unwrap()
    }

    #[test]
    fn avg_single_sample_at_centre() {
        // output_half_pixel, ROI (0,0)-(1,1), one sample at (0.5, 0.5): mean of all four = 1.5.
        let y = run(10, vec![int("sampling_ratio", 1)], plane(), vec![0., 0., 1., 1.]);
        assert_eq!(y.shape(), &[1, 1, 1, 1]);
        assert!((y.view::<f32>().unwrap()[0] - 1.5).abs() < 1e-6);
    }

    #[test]
    fn half_pixel_shifts_by_half() {
        // half_pixel (opset-16 default): ROI (0.5,0.5)-(1.5,1.5) maps to the same sample.
        let y = run(16, vec![int("sampling_ratio", 1)], plane(), vec![0.5, 0.5, 1.5, 1.5]);
        assert!((y.view::<f32>().unwrap()[0] - 1.5).abs() < 1e-6);
        let explicit = vec![int("sampling_ratio", 1), s("coordinate_transformation_mode", "output_half_pixel")];
        let y = run(16, explicit, plane(), vec![0., 0., 1., 1.]);
        assert!((y.view::<f32>().unwrap()[0] - 1.5).abs() < 1e-6);
    }

    #[test]
    fn max_takes_largest_weighted_corner() {
        // Sample at (0.5, 0.5): weighted corners 0, 0.25, 0.5, 0.75 -> 0.75 (not 1.5).
        let y = run(10, vec![int("sampling_ratio", 1), s("mode", "max")], plane(), vec![0., 0., 1., 1.]);
        assert!((y.view::<f32>().unwrap()[0] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn adaptive_grid_and_clamping() {
        // ROI (0,0)-(2,2), output 1x1, adaptive grid 2x2 with samples at 0.5 and 1.5; samples at
        // 1.5 clamp to the last row/column. Values: (0.5,0.5)=1.5, (0.5,1.5)=2, (1.5,0.5)=2.5,
        // (1.5,1.5)=3 -> mean 2.25.
        let y = run(10, vec![], plane(), vec![0., 0., 2., 2.]);
        assert!((y.view::<f32>().unwrap()[0] - 2.25).abs() < 1e-6);
    }
}
