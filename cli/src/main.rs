//! `kiln`: compile ONNX models to `.kiln` artifacts, run, inspect and benchmark them.
//!
//! Every failure prints one line `kiln: error: …` on stderr and exits non-zero (1 for a bad model,
//! input or artifact; 2 for bad command-line usage).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd_bench;
mod cmd_compare;
mod cmd_compile;
mod cmd_inspect;
mod cmd_run;
mod fsutil;
mod inputs;
mod load;
mod npy;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Compile ONNX models into self-contained .kiln artifacts and run them locally")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile an ONNX model into a .kiln artifact.
    Compile(cmd_compile::Args),
    /// Run a model (.kiln, or .onnx compiled in memory) on .npy / .pb inputs.
    Run(cmd_run::Args),
    /// Show a model's inputs, outputs, ops, parameters and metadata.
    Inspect(cmd_inspect::Args),
    /// Measure load time, first-run time, steady-state latency and peak memory.
    Bench(cmd_bench::Args),
    /// Compare two models' outputs (and with --per-layer their intermediate values) on inputs.
    Compare(cmd_compare::Args),
}

fn main() -> ExitCode {
    // A closed stdout (`kiln inspect x.kiln | head`) ends the process quietly, as for any Unix
    // tool: Rust ignores SIGPIPE, and `println!` then panicked on the failed write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal at start-up, before any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Compile(a) => cmd_compile::run(a),
        Cmd::Run(a) => cmd_run::run(a),
        Cmd::Inspect(a) => cmd_inspect::run(a),
        Cmd::Bench(a) => cmd_bench::run(a),
        Cmd::Compare(a) => cmd_compare::run(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            eprintln!("kiln: error: {msg}");
            ExitCode::from(1)
        }
    }
}
