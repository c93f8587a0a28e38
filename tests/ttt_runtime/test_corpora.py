"""The adaptation corpora: found in the standard library, disjoint, the same on every call."""

from __future__ import annotations

import pytest

from ttt_runtime.corpora import CORPORA, CorpusStream, corpus_files
from ttt_runtime.stream import StreamError, default_corpus_root


def test_the_corpora_are_disjoint_fixed_and_where_they_say():
    files = {name: corpus_files(name) for name in CORPORA}
    assert all(files.values())
    assert files == {name: corpus_files(name) for name in CORPORA}  # the same lists, in order
    seen = [path for paths in files.values() for path in paths]
    assert len(seen) == len(set(seen))  # training never sees a shifted or held-out file
    root = default_corpus_root()
    parts = {name: [p.relative_to(root).parts for p in paths] for name, paths in files.items()}
    assert ("pydoc_data", "topics.py") in parts["prose"]
    assert all(p[-1].endswith((".txt", ".rst")) or p[0] == "pydoc_data" for p in parts["prose"])
    assert all(p[0] == "encodings" for p in parts["tables"])
    code = parts["code"] + parts["code-heldout"]
    assert all(p[-1].endswith(".py") and p[0] not in ("pydoc_data", "encodings") for p in code)
    assert not any({"test", "tests", "site-packages"} & set(p) for p in code)
    assert 8 <= len(parts["code"]) / len(parts["code-heldout"]) <= 10  # one in ten held out


def test_a_corpus_stream_reads_its_files_and_an_unknown_name_is_one_line():
    stream = CorpusStream("tables", seq_len=64)
    inputs, targets = next(stream)
    first = corpus_files("tables")[0].read_bytes()[:65]
    assert bytes(inputs[0].astype("uint8")) + bytes([targets[0, -1]]) == first
    with pytest.raises(StreamError, match="^corpus 'poems': must be one of code, code-heldout"):
        CorpusStream("poems", seq_len=64)
