"""The docstrings name what exists: a constant cited as ``NAME`` is defined somewhere in the package (or is an
environment variable the package reads as a string: ``ncsn.app.cpu_kernels``
cites the ones ``ncsn.app.cpu_timing`` names)."""

from __future__ import annotations

import re

from conftest import ROOT

SOURCES = sorted((ROOT / "src" / "ncsn").rglob("*.py"))


def test_every_constant_a_docstring_cites_exists():
    texts = {path: path.read_text() for path in SOURCES}
    defined = set()
    for text in texts.values():
        defined |= set(re.findall(r"^\s*([A-Z][A-Z0-9_]+)\s*(?::[^=\n]*)?=", text, re.MULTILINE))
    missing = [(path.relative_to(ROOT).as_posix(), name) for path, text in texts.items()
               for name in re.findall(r"``(?:[\w.]+\.)?([A-Z][A-Z0-9_]{2,})``", text)
               if name not in defined and not any(f'"{name}"' in t for t in texts.values())]
    assert not missing, missing
