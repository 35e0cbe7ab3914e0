#!/usr/bin/env python3
"""Side-by-side latency of kiln and onnxruntime on the project's real models.

For every case folder that testdata/make_goldens.py writes ($KILN_CACHE or ~/.cache/kiln,
goldens/<case>/{model.txt,meta.json,input_K.npy}) the model is compiled once with
`kiln compile`, then for each thread count several rounds are run. A round is one
`kiln bench ARTIFACT --json` process and one in-process onnxruntime session (creation, first run,
warmup, timed runs), in alternating order so that machine load hits both engines alike. The
reported latency is the median over rounds of each round's median.

Writes a Markdown report to --out (and with --json the raw numbers). Progress goes to stderr.

Usage: cargo build --release -p kiln-cli && python3 benches/compare.py [--cases a,b] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
# The speed issue's target cases, and other real CPU models that check the same holds beyond them
# (a YOLOv8n detector, Magika's byte CNN, a PicoDet layout detector, a PP-LCNet classifier).
TARGET_CASES = ["minilm_b1", "minilm_b4", "ocr_det", "ocr_rec", "ocr_cls", "vad"]
OTHER_CASES = ["yolo_320", "magika", "layout", "lcnet"]
DEFAULT_CASES = TARGET_CASES + OTHER_CASES
GROUPS = {"target": TARGET_CASES, "other": OTHER_CASES}
GROUP_LABELS = {"target": "The issue's six cases", "other": "Other real models"}
ORT_OPT_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
X86_FLAGS = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"]
ARM_FEATURES = ["asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2"]


class BenchError(Exception):
    """A kiln command failed; the case (or thread count) is reported as failed, the run goes on."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- statistics


def percentile(sorted_ms: list[float], p: float) -> float:
    """Same index rule as `kiln bench` (nearest rank, halves rounded away from zero)."""
    return sorted_ms[int(math.floor((len(sorted_ms) - 1) * p + 0.5))]


def spread(values: list[float]) -> float:
    """Round-to-round spread of per-round medians, relative to their median (0.05 = 5 %)."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


# ---------------------------------------------------------------- machine description


def cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (model name, flags / Features)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, _, val = line.partition(":")
            info.setdefault(key.strip(), val.strip())
    return info


def machine_info() -> dict:
    info = cpuinfo()
    arch = platform.machine()
    model = info.get("model name") or info.get("Hardware") or platform.processor() or "unknown"
    if arch in ("aarch64", "arm64"):
        have = set(info.get("Features", "").split())
        wanted = ARM_FEATURES
    else:
        have = set(info.get("flags", "").split())
        wanted = X86_FLAGS
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu": model, "arch": arch, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
        "isa": {f: f in have for f in wanted},
    }


def git_commit(where: Path) -> str:
    """Short HEAD of the git checkout holding `where` (read-only git call)."""
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def command_line() -> str:
    """The interpreter as typed is lost behind version-manager shims; its base name is enough."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = Path(argv[0]).name
    return shlex.join(argv)


# ---------------------------------------------------------------- cases


def cache_dir() -> Path:
    env = os.environ.get("KILN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kiln"


def load_case(cache: Path, name: str) -> dict:
    """Model path, input folder and the named feeds for onnxruntime."""
    folder = cache / "goldens" / name
    model_txt = folder / "model.txt"
    known = sorted(p.parent.name for p in (cache / "goldens").glob("*/model.txt"))
    if known and not folder.exists():
        raise SystemExit(f"compare: unknown case {name!r}; known: {', '.join(known)}")
    if not model_txt.exists():
        raise SystemExit(f"compare: {model_txt} missing: run `python3 testdata/fetch.py && "
                         f"python3 testdata/make_goldens.py` first")
    model = cache / model_txt.read_text().strip()
    if not model.exists():
        raise SystemExit(f"compare: {model} missing: run `python3 testdata/fetch.py` first")
    arrays = []
    while (folder / f"input_{len(arrays)}.npy").exists():
        arrays.append(np.load(folder / f"input_{len(arrays)}.npy"))
    meta_file = folder / "meta.json"
    names = [i["name"] for i in json.loads(meta_file.read_text())["inputs"]] if meta_file.exists() else None
    return {"name": name, "dir": folder, "model": model, "arrays": arrays, "names": names}


def ort_feeds(case: dict, sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    names = case["names"] or [i.name for i in sess.get_inputs()]
    if len(names) != len(case["arrays"]):
        raise SystemExit(f"compare: {case['name']}: {len(case['arrays'])} input files for inputs {names}")
    return dict(zip(names, case["arrays"]))


# ---------------------------------------------------------------- engines


def kiln_compile(kiln: Path, model: Path, out: Path) -> float:
    """Compiles MODEL to OUT; returns the wall time in ms."""
    t = time.perf_counter()
    r = subprocess.run([str(kiln), "compile", str(model), "-o", str(out)], capture_output=True, text=True)
    ms = (time.perf_counter() - t) * 1e3
    if r.returncode != 0:
        raise BenchError(f"kiln compile failed: {tail(r.stderr or r.stdout)}")
    return ms


def kiln_bench(kiln: Path, artifact: Path, inputs: Path, threads: int, warmup: int, iters: int) -> dict:
    """One `kiln bench --json` process; returns its JSON object."""
    cmd = [str(kiln), "bench", str(artifact), "--inputs", str(inputs), "--threads", str(threads),
           "--warmup", str(warmup), "--iters", str(iters), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"kiln bench failed: {tail(r.stderr or r.stdout)}")
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"kiln bench printed no JSON: {tail(r.stdout)}")


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def ort_bench(case: dict, threads: int, warmup: int, iters: int, opt_level: str) -> dict:
    """An onnxruntime session made from scratch, timed like `kiln bench`: creation, first run,
    untimed warmup, then `iters` timed runs."""
    gc.collect()
    t = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = threads
    so.graph_optimization_level = ORT_OPT_LEVELS[opt_level]
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(case["model"]), so, providers=["CPUExecutionProvider"])
    create_ms = (time.perf_counter() - t) * 1e3
    feeds = ort_feeds(case, sess)
    t = time.perf_counter()
    sess.run(None, feeds)
    first_ms = (time.perf_counter() - t) * 1e3
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    gc.disable()  # a collection inside the timed loop would be charged to onnxruntime
    try:
        for _ in range(iters):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        gc.enable()
    del sess
    times.sort()
    return {"threads": threads, "iters": iters, "warmup": warmup, "create_ms": create_ms,
            "first_run_ms": first_ms, "median_ms": percentile(times, 0.5), "p90_ms": percentile(times, 0.9),
            "min_ms": times[0]}


# What a fresh process pays to create an onnxruntime session and run it once, timed from inside
# (imports excluded), as `kiln bench` times load + first run inside its own fresh process. The
# in-harness `ort_bench` creates its sessions in a Python process that has already created and
# freed earlier ones: its heap is faulted in and the library paged in, which no app has at start.
ORT_COLD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
model, threads, level, names, files = json.loads(sys.argv[1])
arrays = [np.load(f) for f in files]
t = time.perf_counter()
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = threads
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
so.log_severity_level = 3
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
create = (time.perf_counter() - t) * 1e3
feeds = dict(zip(names or [i.name for i in sess.get_inputs()], arrays))
t = time.perf_counter()
sess.run(None, feeds)
print(json.dumps({"create_ms": create, "first_run_ms": (time.perf_counter() - t) * 1e3}))
"""


def ort_cold_start(case: dict, threads: int, opt_level: str) -> dict:
    files = [str(case["dir"] / f"input_{i}.npy") for i in range(len(case["arrays"]))]
    arg = json.dumps([str(case["model"]), threads, ORT_OPT_LEVELS[opt_level].name, case["names"], files])
    r = subprocess.run([sys.executable, "-c", ORT_COLD, arg], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"onnxruntime cold start failed: {tail(r.stderr)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- measuring


def measure(args, kiln: Path, case: dict, artifact: Path, threads: int) -> dict:
    """All rounds of one case at one thread count, kiln and onnxruntime alternating."""
    kiln_rounds, ort_rounds = [], []
    tag = f"{case['name']} t={threads}"
    for r in range(args.rounds):
        order = ("kiln", "ort") if r % 2 == 0 else ("ort", "kiln")
        for engine in order:
            where = f"[{tag} round {r + 1}/{args.rounds}]"
            if engine == "kiln":
                k = kiln_bench(kiln, artifact, case["dir"], threads, args.warmup, args.iters)
                kiln_rounds.append(k)
                log(f"{where} kiln median {k['median_ms']:.3f} ms, p90 {k['p90_ms']:.3f}, "
                    f"load+first {k['load_ms'] + k['first_run_ms']:.1f} ms, peak RSS {k['peak_rss_mb']:.0f} MB")
            else:
                o = ort_bench(case, threads, args.warmup, args.iters, args.ort_opt)
                cold = ort_cold_start(case, threads, args.ort_opt)
                o["cold_create_first_ms"] = cold["create_ms"] + cold["first_run_ms"]
                ort_rounds.append(o)
                log(f"{where} ort  median {o['median_ms']:.3f} ms, p90 {o['p90_ms']:.3f}, "
                    f"create+first {o['create_ms'] + o['first_run_ms']:.1f} ms "
                    f"(fresh process {o['cold_create_first_ms']:.1f} ms)")
    return summarize(kiln_rounds, ort_rounds)


def summarize(kiln_rounds: list[dict], ort_rounds: list[dict]) -> dict:
    def med(rounds, key):
        return statistics.median(x[key] for x in rounds)

    k_meds = [x["median_ms"] for x in kiln_rounds]
    o_meds = [x["median_ms"] for x in ort_rounds]
    s = {
        "kiln_median_ms": statistics.median(k_meds), "ort_median_ms": statistics.median(o_meds),
        "kiln_p90_ms": med(kiln_rounds, "p90_ms"), "ort_p90_ms": med(ort_rounds, "p90_ms"),
        "kiln_min_ms": min(x["min_ms"] for x in kiln_rounds), "ort_min_ms": min(x["min_ms"] for x in ort_rounds),
        "kiln_load_first_ms": statistics.median(x["load_ms"] + x["first_run_ms"] for x in kiln_rounds),
        "ort_create_first_ms": statistics.median(x["create_ms"] + x["first_run_ms"] for x in ort_rounds),
        "ort_cold_create_first_ms": statistics.median(x["cold_create_first_ms"] for x in ort_rounds),
        "kiln_peak_rss_mb": max(x["peak_rss_mb"] for x in kiln_rounds),
        "kiln_spread": spread(k_meds), "ort_spread": spread(o_meds),
    }
    s["ratio"] = s["kiln_median_ms"] / s["ort_median_ms"]
    s["startup_ratio"] = s["kiln_load_first_ms"] / s["ort_cold_create_first_ms"]
    return {"summary": s, "kiln_rounds": kiln_rounds, "ort_rounds": ort_rounds}


def run_case(args, kiln: Path, cache: Path, name: str, workdir: Path) -> dict:
    case = load_case(cache, name)
    result: dict = {"model": str(case["model"].relative_to(cache)), "threads": {}}
    artifact = workdir / f"{name}.kiln"
    try:
        result["compile_ms"] = kiln_compile(kiln, case["model"], artifact)
        result["artifact_mb"] = artifact.stat().st_size / 1e6
        log(f"[{name}] compiled {result['model']} in {result['compile_ms']:.0f} ms "
            f"({result['artifact_mb']:.1f} MB)")
    except BenchError as e:
        log(f"[{name}] error: {e}")
        result["error"] = str(e)
        return result
    for t in args.threads:
        try:
            result["threads"][str(t)] = measure(args, kiln, case, artifact, t)
        except BenchError as e:
            log(f"[{name} t={t}] error: {e}")
            result["threads"][str(t)] = {"error": str(e)}
    return result


def overall(results: dict, threads: list[int]) -> dict:
    """Per thread count: geometric mean and maximum of kiln/ORT over the cases that ran."""
    out = {}
    for t in threads:
        ratios = {c: r["threads"][str(t)]["summary"]["ratio"] for c, r in results.items()
                  if "summary" in r["threads"].get(str(t), {})}
        out[str(t)] = summary_of(results, ratios)
        # The same per group (the target cases, the other models) where both ran.
        for group, members in GROUPS.items():
            if set(members) & set(results) and not set(results) <= set(members):
                sub = {c: results[c] for c in members if c in results}
                out[str(t)][group] = summary_of(sub, {c: v for c, v in ratios.items() if c in sub})
    return out


def summary_of(results: dict, ratios: dict) -> dict:
    """Geometric mean and maximum of `ratios`; cases of `results` without a ratio failed."""
    if not ratios:
        return {"cases": 0, "failed": list(results)}
    worst = max(ratios, key=ratios.get)
    return {"geomean_ratio": geomean(list(ratios.values())), "max_ratio": ratios[worst],
            "max_case": worst, "cases": len(ratios), "failed": [c for c in results if c not in ratios]}


# ---------------------------------------------------------------- report


def ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    isa = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in m["isa"].items())
    lines = [
        "# kiln vs onnxruntime",
        "",
        f"- Date: {report['date']}",
        f"- CPU: {m['cpu']} ({m['arch']}), {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable)",
        f"- ISA: {isa}",
        f"- kiln: commit {report['kiln']['commit']}, binary `{report['kiln']['binary']}` "
        f"(built {report['kiln']['built']})",
        f"- onnxruntime: {report['onnxruntime']} CPUExecutionProvider, graph optimizations `{s['ort_opt']}`, "
        f"intra_op = inter_op = threads; numpy {np.__version__}, Python {platform.python_version()}",
        f"- Per engine, case and thread count: {s['rounds']} rounds of {s['warmup']} warmup + {s['iters']} "
        f"timed runs, kiln and onnxruntime alternating; latency = median of the per-round medians",
        f"- Command: `{report['command']}`",
        "",
        "> Absolute times on a shared machine are noise (other jobs, frequency scaling, cache neighbours);",
        "> the kiln/ORT ratios, measured back to back under the same load, are what count.",
        "> ratio < 1 means kiln is faster. `spread` is the larger round-to-round spread of the two engines'",
        "> per-round medians: a ratio closer to 1 than the spread is a tie.",
        "",
    ]
    for t in s["threads"]:
        lines += [f"## {t} thread{'s' if t > 1 else ''}", "",
                  "| case | kiln ms | ORT ms | kiln/ORT | spread | kiln p90 | ORT p90 "
                  "| kiln load+first ms | ORT create+first ms, fresh process | ORT create+first ms, in harness "
                  "| kiln peak RSS MB |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for case, r in report["cases"].items():
            err = r.get("error") or r["threads"].get(str(t), {}).get("error")
            if err:
                lines.append(f"| {case} | error: {err.replace('|', '/')} ||||||||||")
                continue
            x = r["threads"][str(t)]["summary"]
            lines.append(
                f"| {case} | {ms(x['kiln_median_ms'])} | {ms(x['ort_median_ms'])} | **{x['ratio']:.2f}** "
                f"| {max(x['kiln_spread'], x['ort_spread']) * 100:.0f}% "
                f"| {ms(x['kiln_p90_ms'])} | {ms(x['ort_p90_ms'])} "
                f"| {ms(x['kiln_load_first_ms'])} | {ms(x['ort_cold_create_first_ms'])} | {ms(x['ort_create_first_ms'])} "
                f"| {x['kiln_peak_rss_mb']:.0f} |")
        o = report["overall"][str(t)]
        lines.append("")
        if o["cases"]:
            lines.append(f"Geometric mean kiln/ORT **{o['geomean_ratio']:.2f}**, max **{o['max_ratio']:.2f}** "
                         f"({o['max_case']}), over {o['cases']} cases"
                         + (f"; failed: {', '.join(o['failed'])}" if o["failed"] else "") + ".")
        else:
            lines.append("No case succeeded.")
        for group, label in GROUP_LABELS.items():
            g = o.get(group)
            if g and g["cases"]:
                lines.append(f"{label}: geometric mean **{g['geomean_ratio']:.2f}**, max **{g['max_ratio']:.2f}** "
                             f"({g['max_case']}), over {g['cases']} cases.")
        lines.append("")
    lines += ["## Summary", "", "| threads | cases | geomean kiln/ORT | max kiln/ORT | worst case | count |",
              "|--:|---|--:|--:|---|--:|"]
    for t in s["threads"]:
        o = report["overall"][str(t)]
        for label, g in [("all", o)] + [(GROUP_LABELS[k], o[k]) for k in GROUPS if k in o]:
            if g["cases"]:
                lines.append(f"| {t} | {label} | {g['geomean_ratio']:.2f} | {g['max_ratio']:.2f} | {g['max_case']} "
                             f"| {g['cases']} |")
            else:
                lines.append(f"| {t} | {label} | - | - | - | 0 |")
    lines += ["", "Compile times (`kiln compile`, wall clock): " + ", ".join(
        f"{c} {r['compile_ms']:.0f} ms" for c, r in report["cases"].items() if "compile_ms" in r) + ".", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def thread_list(text: str) -> list[int]:
    try:
        ts = [int(x) for x in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}")
    if not ts or any(t < 1 for t in ts):
        raise argparse.ArgumentTypeError("thread counts must be >= 1 (0 means different things to kiln and ORT)")
    return ts


def positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", type=Path, default=REPO / "target/release/kiln",
                    help="kiln binary (default: target/release/kiln in the repo)")
    ap.add_argument("--cases", type=comma_list, default=DEFAULT_CASES,
                    help=f"comma list of goldens case folders (default: {','.join(DEFAULT_CASES)})")
    ap.add_argument("--threads", type=thread_list, default=[1, 2], help="comma list of thread counts (default: 1,2)")
    ap.add_argument("--rounds", type=positive, default=3, help="alternating kiln/ORT rounds (default: 3)")
    ap.add_argument("--iters", type=positive, default=50, help="timed runs per round (default: 50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs per round (default: 5)")
    ap.add_argument("--ort-opt", choices=list(ORT_OPT_LEVELS), default="all",
                    help="onnxruntime graph optimization level (default: all, as users run it)")
    ap.add_argument("--out", type=Path, default=REPO / "benches/RESULTS.md", help="Markdown report path")
    ap.add_argument("--json", type=Path, help="also write the raw numbers (every round) here")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    kiln = args.kiln.resolve()
    if not kiln.is_file() or not os.access(kiln, os.X_OK):
        log(f"compare: error: no kiln binary at {kiln}: build it with `cargo build --release -p kiln-cli` "
            f"(from {REPO}) or pass --kiln PATH")
        return 2
    if args.warmup < 0:
        log("compare: error: --warmup must be >= 0")
        return 2
    cache = cache_dir()
    for name in args.cases:  # fail before any timing if a case is missing
        load_case(cache, name)

    report = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_info(),
        "kiln": {"binary": str(kiln), "commit": git_commit(kiln.parent),
                 "built": dt.datetime.fromtimestamp(kiln.stat().st_mtime).astimezone().strftime("%Y-%m-%d %H:%M")},
        "onnxruntime": ort.__version__,
        "command": command_line(),
        "settings": {"cases": args.cases, "threads": args.threads, "rounds": args.rounds, "iters": args.iters,
                     "warmup": args.warmup, "ort_opt": args.ort_opt},
        "cases": {},
    }
    log(f"compare: kiln {report['kiln']['commit']} vs onnxruntime {ort.__version__} on {report['machine']['cpu']}")
    with tempfile.TemporaryDirectory(prefix="kiln-compare-") as tmp:
        for name in args.cases:
            report["cases"][name] = run_case(args, kiln, cache, name, Path(tmp))
    report["overall"] = overall(report["cases"], args.threads)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(report))
    log(f"compare: wrote {args.out}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        log(f"compare: wrote {args.json}")
    for t in args.threads:
        o = report["overall"][str(t)]
        if o["cases"]:
            log(f"compare: threads {t}: geomean kiln/ORT {o['geomean_ratio']:.2f}, "
                f"max {o['max_ratio']:.2f} ({o['max_case']})")
            for group in GROUPS:
                g = o.get(group)
                if g and g["cases"]:
                    log(f"compare: threads {t}, {GROUP_LABELS[group].lower()}: geomean {g['geomean_ratio']:.2f}, "
                        f"max {g['max_ratio']:.2f} ({g['max_case']})")
    failed = any("error" in r or any("error" in x for x in r["threads"].values()) for r in report["cases"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
