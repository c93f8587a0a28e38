"""The fixed domains of the adaptation experiments, found in the running interpreter's standard
library so that every machine has them and nothing is downloaded (docs/adaptation.md).

- `code`: the standard library's Python sources, the training domain. Every tenth file (in
  sorted order) is held out of it as `code-heldout`, the in-domain control.
- `prose`: English prose training never sees: `pydoc_data` (the reference manual's topics,
  held in a .py file) and every .txt/.rst file.
- `tables`: the `encodings` codec modules built from character tables (`decoding_table`):
  Python syntax training knows, filled with hex escapes and Unicode character names it has
  hardly seen, a near shift beside prose's far one.

The three are disjoint: `code` leaves out pydoc_data, encodings and the test suites (some
distributions ship them apart, so they would make the corpus differ from machine to machine).
File lists are sorted by path inside the standard library: the same on every run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ttt_runtime.stream import ByteStream, StreamError, default_corpus_root

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_HELD_OUT_EVERY = 10  # every tenth code file is the in-domain control, never trained on


def _files(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(suffixes):
                yield Path(folder) / name


def _is_table_codec(path: Path) -> bool:
    return "decoding_table" in path.read_text(encoding="utf-8", errors="replace")


def corpus_files(name: str, root: Path | None = None) -> list[Path]:
    """The files of corpus `name` (one of CORPORA) under the standard library at `root`."""
    root = root or default_corpus_root()
    if name == "prose":
        pydoc = sorted((root / "pydoc_data").glob("*.py"))
        return pydoc + [p for p in _files(root, (".txt", ".rst")) if "pydoc_data" not in p.parts]
    if name == "tables":
        return [p for p in sorted((root / "encodings").glob("*.py")) if _is_table_codec(p)]
    code = [
        p
        for p in _files(root, (".py",))
        if p.relative_to(root).parts[0] not in ("pydoc_data", "encodings")
    ]
    held_out = name == "code-heldout"
    return [p for i, p in enumerate(code) if (i % _HELD_OUT_EVERY == 0) == held_out]


CORPORA = ("code", "code-heldout", "prose", "tables")
SHIFTED = ("prose", "tables")  # the streams adaptation is for; code-heldout is the control


class CorpusStream(ByteStream):
    """A ByteStream over one corpus's files, in their fixed order."""

    def __init__(self, name: str, seq_len: int, batch_size: int = 1, position: int = 0):
        if name not in CORPORA:
            raise StreamError(f"corpus {name!r}: must be one of {', '.join(CORPORA)}")
        self.name = name
        super().__init__(f"corpus {name}", seq_len, batch_size, position)

    def _collect(self, path: str | None) -> tuple[list[Path], list[int]]:
        files = [p for p in corpus_files(self.name) if p.stat().st_size > 0]
        if not files:
            raise StreamError(f"corpus {self.name}: no files under {default_corpus_root()}")
        return files, [p.stat().st_size for p in files]
