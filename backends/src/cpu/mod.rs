//! The CPU backend: a prepared interpreter over the artifact's program, rayon for parallel loops.

use std::sync::Arc;

use kiln_runtime::{Artifact, Backend, Executable, OpTime, Result, SessionState, Value};

pub mod ctx;
mod control_flow;
mod interp;
pub mod gemm;
pub mod qgemm;
pub mod isa;
pub mod kernels;
pub mod par;
mod prepack;
pub mod registry;
pub mod util;

pub use ctx::OpCtx;
pub use interp::eval_step;
pub use registry::{registry, Kernel, Registry};

/// CPU execution with a dedicated rayon pool of `threads` threads (0 = one per core); with one
/// thread, runs execute on the caller's thread and no pool exists (see [`par`]).
pub struct CpuBackend {
    pool: Option<Arc<rayon::ThreadPool>>,
    threads: usize,
}

impl CpuBackend {
    pub fn new(threads: usize) -> Result<CpuBackend> {
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        if threads == 1 {
            return Ok(CpuBackend { pool: None, threads });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kiln-cpu-{i}"))
            .build()
            .map_err(|e| kiln_runtime::Error::Other(format!("cannot start thread pool: {e}")))?;
        Ok(CpuBackend { pool: Some(Arc::new(pool)), threads })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new(0).expect("thread pool")
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn prepare(&self, artifact: Arc<Artifact>) -> Result<Arc<dyn Executable>> {
        let program = interp::Prepared::new(artifact.program(), Some(&artifact))?;
        Ok(Arc::new(CpuExecutable { artifact, program, pool: self.pool.clone() }))
    }
}

struct CpuExecutable {
    artifact: Arc<Artifact>,
    program: interp::Prepared,
    /// None: run serially on the caller's thread.
    pool: Option<Arc<rayon::ThreadPool>>,
}

/// Runs per session that alternate between the pool and the caller's thread to time both.
const PROBE_RUNS: u64 = 16;
/// Ratio of best times past which one way is taken as the clear winner.
const CLEAR_WIN: f64 = 1.3;

#[derive(Default)]
struct CpuState {
    /// With a pool: the latest wall time of a run on the pool and of a run on the caller's thread
    /// alone, in ns (see `CpuExecutable::run`).
    pool_ns: Option<u64>,
    serial_ns: Option<u64>,
    runs: u64,
    peak_bytes: usize,
    profile: Option<std::collections::HashMap<String, (u64, u64)>>,
    memo: interp::Memo,
}

impl Executable for CpuExecutable {
    fn new_state(&self) -> SessionState {
        Box::new(CpuState::default())
    }

    fn run(&self, state: &mut SessionState, inputs: Vec<Value>) -> Result<Vec<Value>> {
        let state = state.downcast_mut::<CpuState>().expect("state made by this executable");
        let memo = std::mem::take(&mut state.memo);
        let mut stats = interp::Stats { profile: state.profile.take(), memo: Some(memo), ..Default::default() };
        let run = || self.program.run(Some(&self.artifact), inputs, &[], &mut stats);
        // A pool pays a hand-off per run and per parallel loop; for small models (Silero VAD:
        // 70 µs) one thread is faster. Each session times both ways and runs the faster one: the
        // first runs alternate (four suffice when one way is 30% faster), then one run in 32 (in
        // 256 for a clear winner) goes the other way; a way's time is its best run (robust to the
        // slow first runs, which page in the mapped weights).
        let out = match &self.pool {
            Some(pool) => {
                state.runs += 1;
                let n = state.runs;
                let (p, s) = (state.pool_ns.unwrap_or(0), state.serial_ns.unwrap_or(u64::MAX));
                // A clear winner (30% apart after two runs each) ends the probing early, and then
                // is re-checked only rarely: a serial run of a big model costs a whole pool run.
                let clear = (p as f64) * CLEAR_WIN < s as f64 || (s as f64) * CLEAR_WIN < p as f64;
                let serial = if n <= PROBE_RUNS && !(n > 4 && clear) {
                    n.is_multiple_of(2)
                } else {
                    let every = if clear { 256 } else { 32 };
                    (s < p) != n.is_multiple_of(every)
                };
                let t0 = std::time::Instant::now();
                let out = if serial { par::serial(run) } else { pool.install(|| par::with_workers_awake(run)) };
                let ns = t0.elapsed().as_nanos() as u64;
                let best = if serial { &mut state.serial_ns } else { &mut state.pool_ns };
                *best = Some(best.map_or(ns, |b| b.min(ns)));
                out
            }
            None => par::serial(run),
        };
        state.profile = stats.profile;
        state.peak_bytes = stats.peak_bytes;
        // A failed run leaves the memo out (a fresh one is rebuilt on the next run).
        state.memo = stats.memo.unwrap_or_default();
        out
    }

    fn peak_bytes(&self, state: &SessionState) -> usize {
        state.downcast_ref::<CpuState>().map(|s| s.peak_bytes).unwrap_or(0)
    }

    fn set_profiling(&self, state: &mut SessionState, on: bool) {
        if let Some(s) = state.downcast_mut::<CpuState>() {
            s.profile = on.then(Default::default);
        }
    }

    fn profile(&self, state: &SessionState) -> Vec<OpTime> {
        let Some(prof) = state.downcast_ref::<CpuState>().and_then(|s| s.profile.as_ref()) else {
            return Vec::new();
        };
        let mut v: Vec<OpTime> =
            prof.iter().map(|(op, &(calls, nanos))| OpTime { op: op.clone(), calls, nanos }).collect();
        v.sort_by(|a, b| b.nanos.cmp(&a.nanos).then_with(|| a.op.cmp(&b.op)));
        v
    }
}
