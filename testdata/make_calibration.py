#!/usr/bin/env python3
"""Make calibration and evaluation sets for kiln's quantization (issue 5).

Writes, under $KILN_CACHE/calib (default ~/.cache/kiln/calib):
  minilm/calib/NNN/input_K.npy   32 sentences, batch 1, unpadded (input_ids, attention_mask)
  minilm/eval/NNN/input_K.npy    32 other sentences
  ocr_rec/calib/NNN/input_0.npy  20 rendered text lines, 48 px high (rapidocr preprocessing)
  ocr_rec/eval/NNN/input_0.npy   40 other lines
  ocr_det/calib/NNN/input_0.npy  8 640x640 pages of text
  ocr_det/eval/NNN/input_0.npy   4 other pages
  <set>/<split>/NNN/meta.json    what the sample is (sentence, line text, page lines)
  <set>/model.txt                the model path relative to the cache dir
K is the index of the graph input (as `kiln run --inputs` and `kiln compile --calibration` read).
Calibration and evaluation texts never overlap. Everything is deterministic (fixed seeds; text
rendering and tokenization come from testdata/make_goldens.py).

Usage: python3 testdata/make_calibration.py [--set minilm|ocr_rec|ocr_det]...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_goldens as mg  # noqa: E402  (tokenizer, fonts, line rendering, graph input names)

MINILM = "models/paraphrase-MiniLM-L3-v2.onnx"
OCR_REC = "models/ch_PP-OCRv4_rec_infer.onnx"
OCR_DET = "models/ch_PP-OCRv4_det_infer.onnx"

MINILM_CALIB = [
    "The museum opens at nine on weekdays and at ten on Sundays.",
    "Please remember to water the tomatoes while I am away next week.",
    "Our quarterly revenue grew by twelve percent compared to last year.",
    "The train to Edinburgh was delayed because of a signal failure.",
    "He spent the whole afternoon fixing the leaking kitchen tap.",
    "Can you recommend a good Italian restaurant near the station?",
    "The new policy requires all employees to complete security training.",
    "A gentle breeze carried the smell of pine across the valley.",
    "My laptop battery drains much faster since the last update.",
    "The committee will announce the winners of the poetry contest on Friday.",
    "Researchers found that regular exercise improves sleep quality.",
    "I forgot my umbrella and got completely soaked on the way home.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Children under twelve must be accompanied by an adult.",
    "The software crashes whenever I try to export a large file.",
    "She has been learning to play the cello for almost three years.",
    "Heavy snowfall closed several mountain passes overnight.",
    "The bank charges a small fee for international transfers.",
    "We watched the sunset from the old lighthouse on the cliff.",
    "This phone case protects against drops of up to two meters.",
    "The city council approved funding for a new bicycle lane.",
    "Why does my sourdough starter smell like nail polish remover?",
    "The hotel room was clean, quiet and surprisingly spacious.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
    "Please send me the signed contract by the end of the day.",
    "The puppy chewed through the charging cable again.",
    "Our flight was cancelled, so we rented a car and drove to Lyon.",
    "Vaccines train the immune system to recognise specific pathogens.",
    "The library extended its opening hours during the exam period.",
    "I prefer tea in the morning and coffee after lunch.",
    "The stock market fell sharply after the interest rate announcement.",
    "Grandma's apple pie is still the best dessert I have ever tasted.",
]

MINILM_EVAL = [
    "The concert hall was packed for the orchestra's farewell performance.",
    "How do I reset my password if I no longer have access to my email?",
    "Fresh strawberries are cheapest at the farmers' market in June.",
    "The bridge will be closed for maintenance until the end of March.",
    "Machine translation has improved dramatically over the past decade.",
    "He apologised for arriving late to the job interview.",
    "The ferry leaves the harbour every two hours in summer.",
    "Our team won the regional football championship last weekend.",
    "Turn left at the bakery and the pharmacy is on your right.",
    "The printer on the third floor keeps jamming with thick paper.",
    "Coral reefs are threatened by rising ocean temperatures.",
    "She painted the living room a warm shade of yellow.",
    "The invoice lists three items that we never ordered.",
    "A good night's sleep helps you concentrate during exams.",
    "The volcano erupted without warning, covering the town in ash.",
    "Is there a vegetarian option on the lunch menu today?",
    "The startup raised two million dollars in its first funding round.",
    "My neighbour's dog barks every time the postman arrives.",
    "The documentary explores the history of jazz in New Orleans.",
    "Please keep your seatbelt fastened while the sign is on.",
    "Wind turbines generated a record share of the country's electricity.",
    "I lost my keys somewhere between the gym and the supermarket.",
    "The professor extended the deadline for the final essay.",
    "Homemade bread tastes better when it cools down a little.",
    "The hiking trail is steep, rocky and poorly marked in places.",
    "Their wedding took place in a small chapel by the sea.",
    "The app sends a notification when your package is delivered.",
    "Rising rents are pushing young families out of the city centre.",
    "The chess tournament lasted for more than six hours.",
    "Don't forget to unplug the iron before leaving the house.",
    "Scientists are studying how bees communicate through dance.",
    "The waiter brought us the wrong order twice in a row.",
]

REC_CALIB = [
    "Invoice 2023-0451", "Total due: $842.10", "Order #88213 shipped", "Main Street 17",
    "Tel: +44 20 7946 0958", "Best before 12/2025", "Net weight 500 g", "Room 304, Floor 3",
    "Thank you for shopping!", "VAT 20% included", "Gate B12 Boarding 14:35", "Batch No. A7X-219",
    "Paid by card **** 4821", "Open Mon-Fri 9-17", "Subtotal 129.99 EUR", "Keep refrigerated",
    "www.example.com/help", "Seat 23C Economy", "Qty 3 x 4.50 = 13.50", "Exit 42 Oakland",
]

REC_EVAL = [
    "Receipt 000193", "Amount: EUR 56.20", "Ship to: 9 Elm Road", "Cashier: Maria",
    "Valid until 31.08.2026", "Flight LH 2042", "Serial SN-55A91-K", "Discount -15%",
    "Platform 6 Departures", "Balance 1,024.00", "Lot 77B Exp 2027", "Postcode SW1A 1AA",
    "Change due 3.75", "Made in Portugal", "Call 0800 123 456", "Visit us again soon",
    "Check-in 15:00", "Table 12 Guests 4", "Ref: QX-4410-22", "Price per kg 2.99",
    "Level 2 Parking", "Tax ID 48-1937265", "Bus 73 to Airport", "Item returned",
    "Delivery Tue 10-12", "Card ending 7710", "Store No. 0381", "Hotline 24/7",
    "Fragile: handle with care", "Total items: 9", "Account 5512-0098", "Order placed 04/11",
    "Tip 10% 4.20", "Express lane only", "Ticket 0047 Row F", "Member since 2019",
    "Code: WELCOME10", "Pickup counter 3", "Dept. Electronics", "Closing time 22:00",
]

DET_CALIB_PAGES = [
    ["ACME Hardware Store", "Receipt 2024-0311", "Hammer 12.99", "Nails x200 4.50", "Total 17.49"],
    ["Meeting notes", "1. Budget review", "2. Hiring plan", "3. Office move in May"],
    ["Boarding Pass", "Passenger: J. Smith", "From LHR to JFK", "Gate 22  Seat 14A"],
    ["Recipe: Pancakes", "2 eggs, 300 ml milk", "200 g flour", "Fry on medium heat"],
    ["Parking Permit", "Zone C Residents", "Valid 01/01 - 12/31", "Plate KL-2048"],
    ["Weekly Timetable", "Mon  Maths  Physics", "Tue  History  Art", "Wed  Biology"],
    ["Hotel Bellavista", "Room 512", "Check-out 11:00", "Breakfast 7-10 am"],
    ["Shipping Label", "To: 88 Bay Road", "Weight 2.4 kg", "Tracking 1Z999AA1"],
]

DET_EVAL_PAGES = [
    ["City Library", "Due date: 14 Nov", "Books borrowed: 3", "Renew online"],
    ["Pharmacy", "Take 1 tablet daily", "After meals", "Refills: 2"],
    ["Concert Ticket", "Row K Seat 18", "Doors open 19:00", "No re-entry"],
    ["Utility Bill", "Account 7781-22", "Amount due 64.30", "Pay by 28 Feb"],
]


def seed_of(name: str) -> int:
    return {"minilm": 501, "ocr_rec": 502, "ocr_det": 503}[name]


def write_sample(folder: Path, arrays: list[np.ndarray], meta: dict) -> None:
    folder.mkdir(parents=True)
    for k, a in enumerate(arrays):
        np.save(folder / f"input_{k}.npy", np.ascontiguousarray(a))
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def minilm_samples(cache: Path, texts: list[str], rng) -> list[tuple[list[np.ndarray], dict]]:
    tok = mg.WordPiece(cache / "models/minilm-tokenizer.json")
    in_names, _ = mg.graph_io(cache / MINILM)
    out = []
    for t in texts:
        feeds = mg.minilm_batch(tok, [t], None)
        if "token_type_ids" in in_names:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        missing = [n for n in in_names if n not in feeds]
        if missing:
            raise SystemExit(f"calib: MiniLM wants inputs {missing} this script does not make")
        out.append(([feeds[n] for n in in_names], {"text": t, "inputs": in_names}))
    return out


def rec_line(text: str, rng) -> np.ndarray:
    """A rendered line preprocessed as rapidocr's TextRecognizer does for a batch of one: height
    48, width 48 * max(320 / 48, w / h), normalised (x/255 - 0.5) / 0.5, BGR NCHW. Font size and
    colours vary per line."""
    size = int(rng.integers(24, 40))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    paper = tuple(int(v) for v in rng.integers(215, 256, 3))
    line = mg.render_line(text, size, fg=ink, bg=paper, margin=int(rng.integers(3, 9)))
    w, h = line.size
    width = max(320, int(math.ceil(48 * w / h)))
    resized_w = min(width, int(math.ceil(48 * w / h)))
    line = line.resize((resized_w, 48), Image.BILINEAR)
    x = mg.to_bgr(line).astype(np.float32).transpose(2, 0, 1) / 255
    x = (x - 0.5) / 0.5
    out = np.zeros((3, 48, width), dtype=np.float32)
    out[:, :, :resized_w] = x
    return out[None]


def rec_samples(cache: Path, texts: list[str], rng) -> list[tuple[list[np.ndarray], dict]]:
    return [([rec_line(t, rng)], {"text": t}) for t in texts]


def det_page(lines: list[str], rng) -> np.ndarray:
    """A 640x640 page (paper gradient + noise) with the lines at random offsets and sizes,
    normalised like rapidocr's DetPreProcess: (x/255 - 0.5) / 0.5, BGR NCHW."""
    grad = np.linspace(0, float(rng.uniform(5, 25)), 640, dtype=np.float32)
    base = (250 - grad[None, :, None] - grad[:, None, None] * 0.5).repeat(3, axis=2)
    img = Image.fromarray(np.clip(base + rng.normal(0, 2.0, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(15, 60))
    for text in lines:
        size = int(rng.integers(18, 44))
        color = tuple(int(v) for v in rng.integers(0, 120, 3))
        draw.text((int(rng.integers(15, 140)), y), text, font=mg.font(size), fill=color)
        y += int(size * rng.uniform(1.6, 2.4))
    x = (mg.to_bgr(img).astype(np.float32) * (1 / 255.0) - 0.5) / 0.5
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def det_samples(cache: Path, pages: list[list[str]], rng) -> list[tuple[list[np.ndarray], dict]]:
    return [([det_page(p, rng)], {"lines": p}) for p in pages]


SETS = {
    "minilm": (MINILM, minilm_samples, MINILM_CALIB, MINILM_EVAL),
    "ocr_rec": (OCR_REC, rec_samples, REC_CALIB, REC_EVAL),
    "ocr_det": (OCR_DET, det_samples, DET_CALIB_PAGES, DET_EVAL_PAGES),
}


def check_disjoint() -> None:
    for name, (_, _, calib, ev) in SETS.items():
        key = lambda x: json.dumps(x)  # noqa: E731
        both = {key(c) for c in calib} & {key(e) for e in ev}
        if both:
            raise SystemExit(f"calib: {name}: calibration and evaluation share {sorted(both)}")


def make_set(cache: Path, out_root: Path, name: str) -> None:
    rel_model, make, calib, ev = SETS[name]
    if not (cache / rel_model).exists():
        raise SystemExit(f"calib: {cache / rel_model} missing: run python3 testdata/fetch.py first")
    rng = np.random.default_rng(seed_of(name))
    staging = out_root / (name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    for split, items in (("calib", calib), ("eval", ev)):
        for i, (arrays, meta) in enumerate(make(cache, items, rng)):
            write_sample(staging / split / f"{i:03d}", arrays, meta)
    (staging / "model.txt").write_text(rel_model + "\n")
    shutil.rmtree(out_root / name, ignore_errors=True)
    os.replace(staging, out_root / name)
    print(f"calib: {name}: {len(calib)} calibration + {len(ev)} evaluation samples in {out_root / name}",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", choices=sorted(SETS), help="only this set (repeatable)")
    args = ap.parse_args()
    check_disjoint()
    cache = mg.cache_dir()
    out_root = cache / "calib"
    out_root.mkdir(parents=True, exist_ok=True)
    for name in args.set or list(SETS):
        make_set(cache, out_root, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
