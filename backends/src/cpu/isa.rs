//! Which SIMD instruction set the CPU kernels use: detected once per process, overridable with the
//! `KILN_ISA` environment variable (scalar|avx2|avx512|neon) or `set_override` (tests, CLI flags).
//!
//! Kernels never assume an ISA from the build target: they ask `active()` at their entry point and
//! pass the answer down, so one binary runs on any machine of its architecture.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// An instruction set a kernel family is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust (whatever the compiler auto-vectorizes for the baseline target).
    Scalar,
    /// x86-64 AVX2 + FMA (Haswell and later, Zen 1 and later): 256-bit vectors.
    Avx2Fma,
    /// x86-64 AVX-512 F/BW/VL/DQ (Skylake-X, Ice Lake, Zen 4/5): 512-bit vectors and masks.
    Avx512,
    /// aarch64 Advanced SIMD: 128-bit vectors.
    Neon,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2Fma, Isa::Avx512, Isa::Neon];

    /// The name `KILN_ISA` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2Fma => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" | "generic" => Some(Isa::Scalar),
            "avx2" | "avx2fma" | "avx2_fma" | "fma" => Some(Isa::Avx2Fma),
            "avx512" | "avx512f" | "avx-512" => Some(Isa::Avx512),
            "neon" | "asimd" => Some(Isa::Neon),
            _ => None,
        }
    }

    /// Whether this CPU can run kernels written for `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2Fma => has_avx2_fma(),
            Isa::Avx512 => has_avx512(),
            Isa::Neon => cfg!(target_arch = "aarch64"),
        }
    }

    /// Stable small code (stored in packed weights).
    pub fn code(self) -> u32 {
        match self {
            Isa::Scalar => 0,
            Isa::Avx2Fma => 1,
            Isa::Avx512 => 2,
            Isa::Neon => 3,
        }
    }

    pub fn from_code(c: u32) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.code() == c)
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Scalar => "scalar",
            Isa::Avx2Fma => "AVX2+FMA",
            Isa::Avx512 => "AVX-512",
            Isa::Neon => "NEON",
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2_fma() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    has_avx2_fma()
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512dq")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// The best ISA this CPU supports.
pub fn best() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(|| {
        [Isa::Avx512, Isa::Avx2Fma, Isa::Neon].into_iter().find(|i| i.supported()).unwrap_or(Isa::Scalar)
    })
}

/// Whether 8-bit dot-product instructions are there for the active ISA (AVX-512 VNNI or AVX-VNNI on
/// x86, the dot-product extension on aarch64).
pub fn vnni() -> bool {
    vnni_for(active())
}

/// `vnni()` for a given ISA.
pub fn vnni_for(isa: Isa) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => std::is_x86_feature_detected!("avx512vnni"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => std::is_x86_feature_detected!("avxvnni"),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => std::arch::is_aarch64_feature_detected!("dotprod"),
        _ => false,
    }
}

/// `requested` if the CPU has it, else the best it has (told once on stderr).
fn usable(requested: Isa, source: &str) -> Isa {
    if requested.supported() {
        return requested;
    }
    let fallback = best();
    static WARNED: OnceLock<()> = OnceLock::new();
    WARNED.get_or_init(|| {
        eprintln!("kiln: {source} asks for {requested} but this CPU lacks it; using {fallback}");
    });
    fallback
}

/// The ISA chosen from the environment at first use (`KILN_ISA`, else the best available).
fn from_env() -> Isa {
    static ENV: OnceLock<Isa> = OnceLock::new();
    *ENV.get_or_init(|| match std::env::var("KILN_ISA") {
        Ok(v) if !v.trim().is_empty() => match Isa::parse(&v) {
            Some(isa) => usable(isa, "KILN_ISA"),
            None => {
                eprintln!("kiln: unknown KILN_ISA={v:?} (expected scalar|avx2|avx512|neon); using {}", best());
                best()
            }
        },
        _ => best(),
    })
}

/// 0 = no override, else `Isa::code() + 1`.
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Force an ISA for the whole process (None = back to `KILN_ISA` / detection). An ISA the CPU lacks
/// falls back to the best available; returns the ISA now in effect.
pub fn set_override(isa: Option<Isa>) -> Isa {
    match isa {
        None => OVERRIDE.store(0, Ordering::Relaxed),
        Some(i) => {
            let i = usable(i, "set_override");
            OVERRIDE.store(i.code() as u8 + 1, Ordering::Relaxed);
        }
    }
    active()
}

/// The ISA kernels should use now.
pub fn active() -> Isa {
    match OVERRIDE.load(Ordering::Relaxed) {
        0 => from_env(),
        c => Isa::from_code(c as u32 - 1).unwrap_or_else(from_env),
    }
}

/// Every ISA this CPU can run, scalar first.
pub fn available() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.supported()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
            assert_eq!(Isa::from_code(isa.code()), Some(isa));
        }
        assert_eq!(Isa::parse("bogus"), None);
        assert_eq!(Isa::Avx512.to_string(), "AVX-512");
    }

    #[test]
    fn scalar_always_there_and_best_supported() {
        assert!(Isa::Scalar.supported());
        assert!(best().supported());
        assert!(available().contains(&best()));
        #[cfg(target_arch = "x86_64")]
        assert!(!Isa::Neon.supported());
    }

    #[test]
    fn override_falls_back_to_supported() {
        // Only this test touches the override; every ISA it can set is correct for the others.
        for isa in Isa::ALL {
            let got = set_override(Some(isa));
            assert!(got.supported());
            if isa.supported() {
                assert_eq!(got, isa);
            }
        }
        set_override(None);
        assert!(active().supported());
    }

    #[test]
    fn kiln_isa_env_is_honoured() {
        // The suite is run under KILN_ISA=scalar and KILN_ISA=<vector ISA>: check the variable
        // reaches the dispatch (an ISA the CPU lacks falls back to the best one).
        if let Some(want) = std::env::var("KILN_ISA").ok().and_then(|v| Isa::parse(&v)) {
            assert_eq!(from_env(), if want.supported() { want } else { best() });
        }
    }
}

/// Run `f` compiled for the active SIMD ISA: the closure, and the `#[inline(always)]` math it
/// calls, are inlined into a `#[target_feature]` function, so its loops vectorise to the widest
/// lanes the CPU has instead of the SSE2 baseline. Only code that is inlined gets the features:
/// mark the closure `#[inline(always)]` (an unmarked closure with a loop stays out of line, compiled
/// for the baseline), and likewise the functions it calls, and prefer `for` loops to `for_each`.
#[inline(always)]
pub(crate) fn with_isa<R>(f: impl FnOnce() -> R) -> R {
    with_isa_of(active(), f)
}

/// `with_isa` for a given ISA (a kernel chosen explicitly, as tests and benchmarks do).
/// An ISA this CPU lacks runs the portable build.
#[inline(always)]
pub(crate) fn with_isa_of<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    match isa {
        // SAFETY: checked just before.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.supported() => unsafe { on_avx512(f) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma if isa.supported() => unsafe { on_avx2(f) },
        _ => f(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")]
unsafe fn on_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
