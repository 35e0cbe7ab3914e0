//! Parallel loops that honour the session's thread count, including a session that runs on the
//! caller's own thread.
//!
//! A one-thread session runs its program directly on the calling thread ("serial"): handing each
//! run to a pool worker and waiting for it costs two futex wake-ups, ~30 µs per run on these
//! machines, which is half of a Silero VAD step. On such a thread rayon's parallel iterators would
//! go to rayon's *global* pool (the caller is not a worker of ours), so every parallel loop in the
//! kernels goes through [`threads`] or the helpers below, which run plain loops when serial.

use std::cell::Cell;

use rayon::prelude::*;

thread_local! {
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with every kiln parallel loop on this thread executed serially (restored on return,
/// also if `f` unwinds).
pub(crate) fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SERIAL.with(|s| s.replace(true)));
    f()
}

/// Whether loops on this thread must stay on it.
#[inline]
pub(crate) fn is_serial() -> bool {
    SERIAL.with(|s| s.get())
}

/// Threads a kernel may use here: 1 when serial, else the current rayon pool's size.
#[inline]
pub fn threads() -> usize {
    if is_serial() {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Run `f` on a pool worker while the pool's other workers stay awake: each polls for work
/// (`rayon::yield_now`) until `f` returns, so the parallel loops of a run start at once instead of
/// waking sleeping threads (a futex round trip, tens of µs here, per loop: most of the gain of a
/// second thread on a 1 ms transformer step). The cost is the idle workers spinning during a run,
/// as onnxruntime's spinning pool does.
pub(crate) fn with_workers_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let others = rayon::current_num_threads().saturating_sub(1);
    if others == 0 || rayon::current_thread_index().is_none() {
        return f();
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    rayon::scope(|s| {
        for _ in 0..others {
            s.spawn(|_| {
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        let out = f();
        done.store(true, std::sync::atomic::Ordering::Release);
        out
    })
}

/// `f(i, chunk)` over the `size`-element chunks of `v` (the last may be shorter).
pub(crate) fn chunks_mut<T: Send>(v: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    let size = size.max(1);
    if threads() == 1 || v.len() <= size {
        v.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        v.par_chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// [`chunks_mut`] with a fallible body; the first error is returned.
pub(crate) fn try_chunks_mut<T: Send, E: Send>(
    v: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) -> Result<(), E> + Sync + Send,
) -> Result<(), E> {
    let size = size.max(1);
    if threads() == 1 || v.len() <= size {
        v.chunks_mut(size).enumerate().try_for_each(|(i, c)| f(i, c))
    } else {
        v.par_chunks_mut(size).enumerate().try_for_each(|(i, c)| f(i, c))
    }
}

/// `f(i, a_chunk, b_chunk)` over chunk pairs of two buffers split in step (`sa` and `sb` elements).
pub(crate) fn chunks_mut2<A: Send, B: Send>(
    a: &mut [A],
    sa: usize,
    b: &mut [B],
    sb: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync + Send,
) {
    let (sa, sb) = (sa.max(1), sb.max(1));
    if threads() == 1 {
        a.chunks_mut(sa).zip(b.chunks_mut(sb)).enumerate().for_each(|(i, (x, y))| f(i, x, y));
    } else {
        a.par_chunks_mut(sa).zip(b.par_chunks_mut(sb)).enumerate().for_each(|(i, (x, y))| f(i, x, y));
    }
}

/// [`chunks_mut2`] with a fallible body.
pub(crate) fn try_chunks_mut2<A: Send, B: Send, E: Send>(
    a: &mut [A],
    sa: usize,
    b: &mut [B],
    sb: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) -> Result<(), E> + Sync + Send,
) -> Result<(), E> {
    let (sa, sb) = (sa.max(1), sb.max(1));
    if threads() == 1 {
        a.chunks_mut(sa).zip(b.chunks_mut(sb)).enumerate().try_for_each(|(i, (x, y))| f(i, x, y))
    } else {
        a.par_chunks_mut(sa).zip(b.par_chunks_mut(sb)).enumerate().try_for_each(|(i, (x, y))| f(i, x, y))
    }
}

/// `f(item)` for every item.
pub(crate) fn for_each<T: Sync>(items: &[T], f: impl Fn(&T) + Sync + Send) {
    if threads() == 1 || items.len() <= 1 {
        items.iter().for_each(f);
    } else {
        items.par_iter().for_each(f);
    }
}

/// `f(item)` for every item; the first error is returned.
pub(crate) fn try_for_each<T: Sync, E: Send>(items: &[T], f: impl Fn(&T) -> Result<(), E> + Sync + Send) -> Result<(), E> {
    if threads() == 1 || items.len() <= 1 {
        items.iter().try_for_each(f)
    } else {
        items.par_iter().try_for_each(f)
    }
}

/// `[f(0), f(1), …, f(n-1)]`.
pub(crate) fn map_range<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    if threads() == 1 || n <= 1 {
        (0..n).map(f).collect()
    } else {
        (0..n).into_par_iter().map(f).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_scoped_and_restored() {
        assert!(!is_serial());
        let inner = serial(|| (is_serial(), threads()));
        assert_eq!(inner, (true, 1));
        assert!(!is_serial());
        let r = std::panic::catch_unwind(|| serial(|| panic!("boom")));
        assert!(r.is_err());
        assert!(!is_serial(), "restored after unwinding");
    }

    #[test]
    fn serial_loops_stay_on_the_calling_thread() {
        let me = std::thread::current().id();
        let mut v = vec![0usize; 1000];
        serial(|| {
            chunks_mut(&mut v, 7, |i, c| {
                assert_eq!(std::thread::current().id(), me);
                c.iter_mut().for_each(|x| *x = i);
            })
        });
        assert_eq!(v[999], 999 / 7);
        let squares = serial(|| map_range(50, |i| (std::thread::current().id() == me, i * i)));
        assert!(squares.iter().all(|&(same, _)| same));
        assert_eq!(squares[7].1, 49);
    }
}
