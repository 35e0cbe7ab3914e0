//! `kiln bench MODEL --inputs DIR`: load time, first-run time, steady-state latency
//! (median / p90 / min over `--iters` runs after `--warmup`), and peak memory. With `--profile`,
//! another `--iters` runs (after the timed ones, so the clock reads do not skew them) give the
//! time per op type.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use kiln_runtime::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A .kiln artifact or an .onnx model (compiled in memory; then load time includes compiling).
    model: PathBuf,
    /// Folder with input_K.npy / input_K.pb.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// NAME=FILE, an input by name (repeatable).
    #[arg(long = "input")]
    input: Vec<String>,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Untimed runs before measuring.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also time every op (in extra runs) and print where the time goes, per op type.
    #[arg(long)]
    profile: bool,
}

/// Peak resident set size of this process in MB (Linux: VmHWM).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

pub fn run(a: Args) -> Result<()> {
    if a.iters == 0 {
        return Err(Error::Input("--iters must be at least 1".into()));
    }
    let loaded = crate::load::model(&a.model, a.threads)?;
    let infos = loaded.model.inputs();
    let values = crate::inputs::gather(&infos, a.inputs.as_deref(), &a.input)?;
    let mut session = loaded.model.session();
    let t = Instant::now();
    session.run_values(values.clone())?;
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    let bar = ProgressBar::new((a.warmup + a.iters) as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} runs [{elapsed}]").unwrap());
    for _ in 0..a.warmup {
        session.run_values(values.clone())?;
        bar.inc(1);
    }
    let mut times = Vec::with_capacity(a.iters);
    for _ in 0..a.iters {
        let inputs = values.clone();
        let t = Instant::now();
        session.run_values(inputs)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        bar.inc(1);
    }
    bar.finish_and_clear();
    times.sort_by(|a, b| a.total_cmp(b));
    let median = percentile(&times, 0.5);
    let p90 = percentile(&times, 0.9);
    let min = times[0];
    let rss = peak_rss_mb();
    let arena_mb = session.peak_bytes() as f64 / 1e6;
    let profile = if a.profile { Some(profile_runs(&mut session, &values, a.iters)?) } else { None };
    if a.json {
        let j = serde_json::json!({
            "model": a.model, "backend": loaded.model.backend_name(), "threads": a.threads,
            "iters": a.iters, "warmup": a.warmup,
            "load_ms": loaded.load_ms, "first_run_ms": first_ms,
            "median_ms": median, "p90_ms": p90, "min_ms": min,
            "peak_rss_mb": rss, "peak_intermediate_mb": arena_mb,
        });
        let mut j = j;
        if let Some((wall, ops)) = &profile {
            j["profile"] = serde_json::json!({
                "run_ms": wall,
                "ops": ops.iter().map(|o| serde_json::json!({
                    "op": o.op, "calls_per_run": o.calls as f64 / a.iters as f64,
                    "ms_per_run": o.nanos as f64 / 1e6 / a.iters as f64,
                })).collect::<Vec<_>>(),
            });
        }
        println!("{j}");
    } else {
        println!("model      {} on {}", a.model.display(), loaded.model.backend_name());
        println!("load       {:.2} ms", loaded.load_ms);
        println!("first run  {first_ms:.3} ms");
        println!("latency    median {median:.3} ms, p90 {p90:.3} ms, min {min:.3} ms ({} runs)", a.iters);
        println!("memory     peak RSS {rss:.1} MB, peak intermediates {arena_mb:.1} MB");
        if let Some((wall, ops)) = &profile {
            let n = a.iters as f64;
            println!("profile    {wall:.3} ms per profiled run (ops inside If/Loop/Scan count also in their own row)");
            println!("  {:<28} {:>9} {:>11} {:>6}", "op", "calls/run", "ms/run", "%");
            for o in ops {
                let ms = o.nanos as f64 / 1e6 / n;
                println!("  {:<28} {:>9.1} {:>11.4} {:>5.1}%", o.op, o.calls as f64 / n, ms, 100.0 * ms / wall);
            }
        }
    }
    Ok(())
}

/// `iters` runs with op timing on: (mean wall ms per run, per-op totals over all of them).
fn profile_runs(
    session: &mut kiln_runtime::Session,
    values: &[kiln_runtime::Value],
    iters: usize,
) -> Result<(f64, Vec<kiln_runtime::OpTime>)> {
    session.set_profiling(true);
    let t = Instant::now();
    for _ in 0..iters {
        session.run_values(values.to_vec())?;
    }
    let wall = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
    let ops = session.profile();
    session.set_profiling(false);
    Ok((wall, ops))
}
