#!/usr/bin/env python3
"""Issue 5 (compression) figures, measured end to end with a kiln binary.

Compiles the real models with `kiln compile` in each compression mode, runs the evaluation sets
that testdata/make_calibration.py writes (never the calibration samples) with `kiln run`, and
reports, against the issue's targets:
  - MiniLM int8 / int8-dynamic / int4 (with the calibration sentences, so GPTQ; and without,
    so RTN): mean cosine of output 3 (pooled embedding) vs kiln fp32;
    latency at 1 thread, batch 1, vs onnxruntime's quantize_dynamic(per_channel=True, QInt8)
    model (side by side, alternating rounds as benches/compare.py); int4 artifact size vs .onnx
  - PP-OCRv4 rec int8: greedy CTC text (argmax over classes, repeats collapsed, blank 0 dropped)
    equal to fp32's on the eval lines
  - PP-OCRv4 det: int8 and `--prune channels:0.3` speed vs kiln fp32 at 1 thread;
    `--prune magnitude:0.5` artifact size vs the unpruned artifact
A mode kiln cannot do yet shows as "n/a (error: ...)"; no number is ever made up.

Writes benches/QUANT_RESULTS.md (--out). Progress goes to stderr.

Usage: cargo build --release -p kiln-cli && python3 testdata/make_calibration.py &&
       python3 benches/quant.py [--kiln PATH] [--rounds 3] [--iters 30] [--only minilm,rec,det]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as cmp  # noqa: E402  (timing helpers shared with the kiln-vs-ORT bench)

REPO = Path(__file__).resolve().parent.parent
MINILM = "models/paraphrase-MiniLM-L3-v2.onnx"
OCR_REC = "models/ch_PP-OCRv4_rec_infer.onnx"
OCR_DET = "models/ch_PP-OCRv4_det_infer.onnx"


class Failed(Exception):
    """A step failed; its row shows the error."""


log = cmp.log


# ---------------------------------------------------------------- kiln steps


def kiln_compile(kiln: Path, model: Path, out: Path, flags: list[str]) -> dict:
    t = time.perf_counter()
    cmd = [str(kiln), "compile", str(model), "-o", str(out), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise Failed(cmp.tail(r.stderr or r.stdout, 1))
    secs = time.perf_counter() - t
    log(f"  compiled {model.name} {' '.join(flags) or '(fp32)'}: {out.stat().st_size / 1e6:.1f} MB in {secs:.1f} s")
    return {"bytes": out.stat().st_size, "seconds": secs}


def kiln_outputs(kiln: Path, artifact: Path, samples: list[Path], work: Path) -> list[list[np.ndarray]]:
    """Outputs of `kiln run` on every sample folder (one process per sample, 1 thread)."""
    outs = []
    for s in samples:
        d = work / s.name
        shutil.rmtree(d, ignore_errors=True)
        r = subprocess.run([str(kiln), "run", str(artifact), "--inputs", str(s), "--output-dir", str(d),
                            "--threads", "1"], capture_output=True, text=True)
        if r.returncode != 0:
            raise Failed(f"kiln run: {cmp.tail(r.stderr or r.stdout, 1)}")
        k, got = 0, []
        while (d / f"output_{k}.npy").exists():
            got.append(np.load(d / f"output_{k}.npy"))
            k += 1
        outs.append(got)
    return outs


def sample_dirs(folder: Path) -> list[Path]:
    dirs = sorted(p for p in folder.iterdir() if (p / "input_0.npy").exists())
    if not dirs:
        raise SystemExit(f"quant: no samples in {folder}: run python3 testdata/make_calibration.py")
    return dirs


# ---------------------------------------------------------------- accuracy


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


def mean_cosine(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], k: int) -> tuple[float, float]:
    cs = [cosine(r[k], g[k]) for r, g in zip(ref, got)]
    return float(np.mean(cs)), float(np.min(cs))


def ctc_greedy(probs: np.ndarray) -> list[int]:
    """[1, T, C] -> class ids: argmax per step, repeats collapsed, blank (0) dropped."""
    ids = probs[0].argmax(-1)
    return [int(c) for i, c in enumerate(ids) if c != 0 and (i == 0 or c != ids[i - 1])]


# ---------------------------------------------------------------- latency


def bench_pair(args, a: tuple[str, callable], b: tuple[str, callable]) -> dict:
    """Alternating rounds of two timing functions (each returns a median in ms)."""
    res = {a[0]: [], b[0]: []}
    for r in range(args.rounds):
        for name, fn in (a, b) if r % 2 == 0 else (b, a):
            ms = fn()
            res[name].append(ms)
            log(f"    round {r + 1}/{args.rounds} {name}: {ms:.3f} ms")
    return {k: float(np.median(v)) for k, v in res.items()} | {"rounds": res}


def kiln_timer(args, kiln: Path, artifact: Path, inputs: Path):
    def run() -> float:
        try:
            return cmp.kiln_bench(kiln, artifact, inputs, 1, args.warmup, args.iters)["median_ms"]
        except cmp.BenchError as e:
            raise Failed(str(e))
    return run


def ort_timer(args, model: Path, inputs: Path, names: list[str]):
    arrays = []
    while (inputs / f"input_{len(arrays)}.npy").exists():
        arrays.append(np.load(inputs / f"input_{len(arrays)}.npy"))
    case = {"name": model.name, "model": model, "arrays": arrays, "names": names}
    return lambda: cmp.ort_bench(case, 1, args.warmup, args.iters, "all")["median_ms"]


def ort_session(model: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def ort_dynamic_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)


# ---------------------------------------------------------------- the figures


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []  # figure, target, measured, verdict
        self.notes: list[str] = []

    def add(self, figure: str, target: str, value: float | None, ok: bool | None, fmt: str, err: str = ""):
        if value is None:
            self.rows.append((figure, target, f"n/a (error: {err.replace('|', '/')})", "-"))
        else:
            self.rows.append((figure, target, fmt.format(value), "pass" if ok else "**FAIL**"))

    def fail(self, figure: str, target: str, err: Exception | str):
        self.add(figure, target, None, None, "", str(err))


def step(rep: Report, figure: str, target: str, fn):
    """Run one measurement; a failure becomes an n/a row."""
    try:
        return fn()
    except (Failed, cmp.BenchError, subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
        log(f"  {figure}: error: {e}")
        rep.fail(figure, target, e)
        return None


def minilm(args, kiln: Path, cache: Path, work: Path, rep: Report) -> None:
    log("[minilm]")
    model = cache / MINILM
    calib, evals = cache / "calib/minilm/calib", sample_dirs(cache / "calib/minilm/eval")
    names = json.loads((evals[0] / "meta.json").read_text())["inputs"]
    arts = {}
    for mode, flags in [("fp32", []), ("int8", ["--quantize", "int8", "--calibration", str(calib)]),
                        ("int8-dynamic", ["--quantize", "int8-dynamic"]),
                        ("int4", ["--quantize", "int4", "--calibration", str(calib)]),
                        ("int4-rtn", ["--quantize", "int4"])]:
        out = work / f"minilm_{mode}.kiln"
        try:
            kiln_compile(kiln, model, out, flags)
            arts[mode] = out
        except Failed as e:
            arts[mode] = e
    if isinstance(arts["fp32"], Exception):
        for fig in ["MiniLM int8 cosine", "MiniLM int8-dynamic cosine", "MiniLM int4 cosine"]:
            rep.fail(fig, "", f"fp32 compile: {arts['fp32']}")
        return
    ref = kiln_outputs(kiln, arts["fp32"], evals, work / "minilm_fp32_out")
    # onnxruntime's own int8 for context (its fp32 as the reference)
    ort_q = work / "minilm_ort_int8.onnx"
    try:
        ort_dynamic_int8(model, ort_q)
        so, sq = ort_session(model), ort_session(ort_q)
        feeds = [dict(zip(names, (np.load(s / f"input_{k}.npy") for k in range(len(names))))) for s in evals]
        c = [cosine(so.run(None, f)[3], sq.run(None, f)[3]) for f in feeds]
        rep.notes.append(f"onnxruntime quantize_dynamic(per_channel=True, QInt8) MiniLM: mean cosine of output 3 "
                         f"vs its fp32 {np.mean(c):.5f} (min {np.min(c):.5f}) on the same {len(evals)} sentences.")
    except Exception as e:  # noqa: BLE001  (context only)
        ort_q = None
        rep.notes.append(f"onnxruntime quantize_dynamic failed: {e}")
    target = {"int8": 0.998, "int8-dynamic": 0.998, "int4": 0.99, "int4-rtn": 0.99}
    what = {"int4": "int4 (GPTQ from the 32 calibration sentences)", "int4-rtn": "int4 without calibration data (RTN)"}
    for mode in ["int8", "int8-dynamic", "int4", "int4-rtn"]:
        fig = f"MiniLM {what.get(mode, mode)}: mean cosine of output 3 vs fp32 ({len(evals)} eval sentences)"
        art = arts[mode]
        if isinstance(art, Exception):
            rep.fail(fig, f">= {target[mode]}", art)
            continue

        def acc(art=art, mode=mode):
            got = kiln_outputs(kiln, art, evals, work / f"minilm_{mode}_out")
            mean, worst = mean_cosine(ref, got, 3)
            rep.add(fig, f">= {target[mode]}", mean, mean >= target[mode], "{:.5f}" + f" (min {worst:.5f})")
        step(rep, fig, f">= {target[mode]}", acc)
    onnx_bytes = model.stat().st_size
    fig = "MiniLM int4: .kiln size / .onnx size"
    if isinstance(arts["int4"], Exception):
        rep.fail(fig, "<= 0.2", arts["int4"])
    else:
        r = arts["int4"].stat().st_size / onnx_bytes
        rep.add(fig, "<= 0.2", r, r <= 0.2, "{:.3f}" + f" ({arts['int4'].stat().st_size / 1e6:.1f} MB / {onnx_bytes / 1e6:.1f} MB)")
    for mode in ["int8", "int8-dynamic"]:
        fig = f"MiniLM {mode}: latency / ORT quantize_dynamic latency (1 thread, batch 1)"
        if isinstance(arts[mode], Exception):
            rep.fail(fig, "<= 0.8", arts[mode])
            continue
        if ort_q is None:
            rep.fail(fig, "<= 0.8", "no onnxruntime int8 model")
            continue

        def lat(mode=mode):
            log(f"  timing {mode} vs ORT int8")
            t = bench_pair(args, ("kiln", kiln_timer(args, kiln, arts[mode], evals[0])),
                           ("ort", ort_timer(args, ort_q, evals[0], names)))
            r = t["kiln"] / t["ort"]
            rep.add(fig, "<= 0.8", r, r <= 0.8, "{:.2f}" + f" (kiln {t['kiln']:.3f} ms, ORT {t['ort']:.3f} ms)")
        step(rep, fig, "<= 0.8", lat)


def rec(args, kiln: Path, cache: Path, work: Path, rep: Report) -> None:
    log("[ocr_rec]")
    model = cache / OCR_REC
    calib, evals = cache / "calib/ocr_rec/calib", sample_dirs(cache / "calib/ocr_rec/eval")
    base = ["--quantize", "int8", "--calibration", str(calib)]
    fp32 = work / "rec_fp32.kiln"
    # Every eligible layer int8, and with an accuracy budget (the layers whose int8 error
    # dominates stay float: `--report` lists them).
    variants = [("all layers int8", "rec_int8", base), ("--accuracy-budget 0.002", "rec_int8_budget", [*base, "--accuracy-budget", "0.002"])]
    ref = None
    for what, name, flags in variants:
        fig = f"PP-OCRv4 rec int8 ({what}): greedy CTC text equal to fp32's ({len(evals)} eval lines)"

        def run(name=name, flags=flags, fig=fig):
            nonlocal ref
            if ref is None:
                kiln_compile(kiln, model, fp32, [])
                ref = kiln_outputs(kiln, fp32, evals, work / "rec_fp32_out")
            q = work / f"{name}.kiln"
            kiln_compile(kiln, model, q, flags)
            got = kiln_outputs(kiln, q, evals, work / f"{name}_out")
            same = [ctc_greedy(r[0]) == ctc_greedy(g[0]) for r, g in zip(ref, got)]
            frac = float(np.mean(same))
            rep.add(fig, ">= 95%", frac * 100, frac >= 0.95, "{:.1f}%" + f" ({sum(same)}/{len(same)})")
        step(rep, fig, ">= 95%", run)


def det(args, kiln: Path, cache: Path, work: Path, rep: Report) -> None:
    log("[ocr_det]")
    model = cache / OCR_DET
    calib, evals = cache / "calib/ocr_det/calib", sample_dirs(cache / "calib/ocr_det/eval")
    fp32 = work / "det_fp32.kiln"
    try:
        kiln_compile(kiln, model, fp32, [])
    except Failed as e:
        for fig in ["det int8 speed-up", "det channels:0.3 speed-up", "det magnitude:0.5 size"]:
            rep.fail(fig, "", f"fp32 compile: {e}")
        return
    ref = None
    variants = [
        ("int8", ["--quantize", "int8", "--calibration", str(calib)], ">= 1.8"),
        ("channels:0.3", ["--prune", "channels:0.3"], ">= 1.3"),
    ]
    for name, flags, target in variants:
        fig = f"PP-OCRv4 det {name}: speed-up vs kiln fp32 (1 thread)"

        def run(name=name, flags=flags, target=target, fig=fig):
            nonlocal ref
            art = work / f"det_{name.replace(':', '_')}.kiln"
            kiln_compile(kiln, model, art, flags)
            log(f"  timing det {name} vs fp32")
            t = bench_pair(args, ("fp32", kiln_timer(args, kiln, fp32, evals[0])),
                           (name, kiln_timer(args, kiln, art, evals[0])))
            speedup = t["fp32"] / t[name]
            if ref is None:
                ref = kiln_outputs(kiln, fp32, evals, work / "det_fp32_out")
            got = kiln_outputs(kiln, art, evals, work / f"det_{name.replace(':', '_')}_out")
            mean, _ = mean_cosine(ref, got, 0)
            rep.add(fig, target, speedup, speedup >= float(target.split()[1]),
                    "{:.2f}x" + f" (fp32 {t['fp32']:.1f} ms, {name} {t[name]:.1f} ms; output cosine {mean:.4f})")
        step(rep, fig, target, run)
    fig = "PP-OCRv4 det magnitude:0.5: .kiln size / unpruned .kiln size"

    def size():
        art = work / "det_magnitude.kiln"
        kiln_compile(kiln, model, art, ["--prune", "magnitude:0.5"])
        r = art.stat().st_size / fp32.stat().st_size
        rep.add(fig, "<= 0.6", r, r <= 0.6, "{:.3f}" + f" ({art.stat().st_size / 1e6:.2f} MB / "
                f"{fp32.stat().st_size / 1e6:.2f} MB)")
    step(rep, fig, "<= 0.6", size)


def markdown(rep: Report, args, kiln: Path) -> str:
    m = cmp.machine_info()
    commit = cmp.git_commit(kiln.parent)
    if commit == "unknown":
        commit = f"unknown; this checkout is at {cmp.git_commit(REPO)}"
    lines = [
        "# kiln compression (issue 5)",
        "",
        f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- CPU: {m['cpu']} ({m['arch']}), {m['logical_cpus']} logical CPUs",
        f"- kiln: binary `{kiln}` (commit {commit}); onnxruntime {ort.__version__}",
        f"- Accuracy on the evaluation sets of testdata/make_calibration.py (never the calibration samples), "
        f"against kiln's own fp32 artifact; latency = median of {args.rounds} alternating rounds of "
        f"{args.warmup} warmup + {args.iters} timed runs (`kiln bench --threads 1`, onnxruntime 1 thread)",
        f"- Command: `{cmp.command_line()}`",
        "",
        "| figure | target | measured | |",
        "|---|---|---|---|",
    ]
    lines += [f"| {f} | {t} | {v} | {ok} |" for f, t, v, ok in rep.rows]
    if rep.notes:
        lines += [""] + [f"- {n}" for n in rep.notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", type=Path, default=REPO / "target/release/kiln")
    ap.add_argument("--rounds", type=cmp.positive, default=3)
    ap.add_argument("--iters", type=cmp.positive, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", type=cmp.comma_list, default=["minilm", "rec", "det"])
    ap.add_argument("--out", type=Path, default=REPO / "benches/QUANT_RESULTS.md")
    args = ap.parse_args()
    kiln = args.kiln.resolve()
    if not kiln.is_file() or not os.access(kiln, os.X_OK):
        log(f"quant: error: no kiln binary at {kiln} (cargo build --release -p kiln-cli, or --kiln PATH)")
        return 2
    cache = cmp.cache_dir()
    if not (cache / "calib").is_dir():
        log(f"quant: error: {cache / 'calib'} missing: run python3 testdata/make_calibration.py")
        return 2
    rep = Report()
    parts = {"minilm": minilm, "rec": rec, "det": det}
    with tempfile.TemporaryDirectory(prefix="kiln-quant-") as tmp:
        for name in args.only:
            if name not in parts:
                log(f"quant: error: unknown part {name!r} (minilm, rec, det)")
                return 2
            parts[name](args, kiln, cache, Path(tmp), rep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rep, args, kiln))
    log(f"quant: wrote {args.out}")
    for f, t, v, ok in rep.rows:
        log(f"  {ok:>8}  {f}: {v} (target {t})")
    return 0 if all(ok == "pass" for *_, ok in rep.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
