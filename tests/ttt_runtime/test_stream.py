"""ByteStream: files, folders (text only), the stdlib default, wrap-around, lanes, errors."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ttt_runtime.stream import ByteStream, StreamError, check_data


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_single_file_chunks_are_contiguous_and_wrap(tmp_path):
    text = bytes(range(32, 127))  # 95 distinct bytes
    (tmp_path / "a.txt").write_bytes(text)
    stream = ByteStream(str(tmp_path / "a.txt"), seq_len=40)
    chunks = take(stream, 5)
    assert stream.position == 200
    for inputs, targets in chunks:
        assert inputs.shape == targets.shape == (1, 40) and inputs.dtype == np.int32
        np.testing.assert_array_equal(inputs[0, 1:], targets[0, :-1])
    joined = np.concatenate([inputs[0] for inputs, _ in chunks])
    expected = np.frombuffer((text * 3)[:200], dtype=np.uint8)
    np.testing.assert_array_equal(joined, expected)
    # the target of a chunk's last byte is the next chunk's first input
    assert chunks[0][1][0, -1] == chunks[1][0][0, 0]


def test_folder_is_recursive_sorted_and_text_only(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_bytes(b"first ")
    (tmp_path / "b" / "c.md").write_bytes("zweite Zeile \u00e9 ".encode())
    (tmp_path / "b" / "image.bin").write_bytes(b"\x89PNG\0\0\x01")
    (tmp_path / "empty.txt").write_bytes(b"")
    stream = ByteStream(str(tmp_path), seq_len=8)
    assert [p.name for p in stream.files] == ["a.txt", "c.md"]
    corpus = b"first " + "zweite Zeile \u00e9 ".encode()
    assert stream.read(0, len(corpus)) == corpus
    assert "2 text files" in stream.describe()


def test_batch_rows_read_separate_contiguous_lanes(tmp_path):
    (tmp_path / "t.txt").write_bytes(bytes(range(65, 65 + 60)))
    stream = ByteStream(str(tmp_path / "t.txt"), seq_len=5, batch_size=3)
    first, second = take(stream, 2)
    assert first[0].shape == (3, 5)
    np.testing.assert_array_equal(first[0][:, 0], [65, 85, 105])  # lanes 20 bytes apart
    np.testing.assert_array_equal(second[0][:, 0], first[0][:, 0] + 5)


def test_position_resumes_the_stream(tmp_path):
    (tmp_path / "t.txt").write_bytes(os.urandom(64).hex().encode())
    stream = ByteStream(str(tmp_path / "t.txt"), seq_len=7)
    take(stream, 3)
    resumed = ByteStream(str(tmp_path / "t.txt"), seq_len=7, position=stream.position)
    np.testing.assert_array_equal(next(resumed)[0], next(stream)[0])


def test_default_is_the_running_pythons_standard_library():
    stream = ByteStream(None, seq_len=256, batch_size=2)
    stdlib = sysconfig.get_paths()["stdlib"]
    assert all(str(p).startswith(stdlib) for p in stream.files)
    assert any(p.name == "os.py" for p in stream.files)
    assert not any("site-packages" in p.parts for p in stream.files)
    inputs, targets = next(stream)
    assert inputs.shape == (2, 256) and inputs.min() >= 0 and inputs.max() < 256
    assert "standard library" in stream.describe() and stdlib in stream.describe()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nope", "does not exist"),
        (lambda d: (d / "e.txt").write_bytes(b"") and None or d / "e.txt", "is empty"),
        (lambda d: (d / "x.bin").write_bytes(b"\0\1\2") and None or d / "x.bin", "not a text"),
        (lambda d: (d / "sub").mkdir() or d / "sub", "no non-empty text files"),
        (lambda d: Path("/dev/urandom"), "neither a file nor a folder"),
        (lambda d: d / ("a" * 300), "File name too long"),  # was an OSError traceback
        (lambda d: (d / "loop").symlink_to("loop") or d / "loop", "Too many levels of symbolic"),
    ],
    ids=["missing", "empty-file", "binary-file", "empty-folder", "device", "too-long", "loop"],
)
@pytest.mark.parametrize(
    "open_data", [lambda p: ByteStream(p, seq_len=4), check_data], ids=["stream", "check"]
)
def test_bad_paths_raise_one_line_errors_naming_the_path(tmp_path, make, message, open_data):
    path = make(tmp_path)
    with pytest.raises(StreamError, match=message) as err:
        open_data(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_check_sniffs_a_bounded_number_of_files(tmp_path):
    for name in ("a.bin", "b.bin", "c.bin"):
        (tmp_path / name).write_bytes(b"\0\1\2")
    with pytest.raises(StreamError, match="no non-empty text files"):
        check_data(str(tmp_path), max_files=3)
    (tmp_path / "d.txt").write_bytes(b"text after three binary files")
    check_data(str(tmp_path), max_files=3)  # a fourth file: not sniffed, left to the stream
    assert [p.name for p in ByteStream(str(tmp_path), seq_len=4).files] == ["d.txt"]
    (tmp_path / "d.txt").write_bytes(b"\0")
    check_data(str(tmp_path), max_files=3)
    with pytest.raises(StreamError, match="no non-empty text files"):
        ByteStream(str(tmp_path), seq_len=4)


def test_check_accepts_a_folder_with_a_text_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\0\1\2")
    (tmp_path / "b.txt").write_bytes(b"words")
    check_data(str(tmp_path))
    check_data(str(tmp_path / "b.txt"))


def test_file_gone_after_the_scan_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a" * 10)
    (tmp_path / "b.txt").write_bytes(b"b" * 10)
    stream = ByteStream(str(tmp_path), seq_len=4)
    (tmp_path / "b.txt").unlink()
    next(stream)  # still inside a.txt
    with pytest.raises(StreamError, match="b.txt is unreadable"):
        take(stream, 3)


@pytest.mark.parametrize("kwargs", [{"seq_len": 0}, {"seq_len": 4, "batch_size": 0}])
def test_bad_sizes_are_errors(tmp_path, kwargs):
    (tmp_path / "t.txt").write_bytes(b"text")
    with pytest.raises(StreamError, match=next(iter(k for k, v in kwargs.items() if v == 0))):
        ByteStream(str(tmp_path / "t.txt"), **kwargs)


def test_a_file_larger_than_memory_is_streamed_a_window_at_a_time(tmp_path):
    # 1 TiB, sparse: text at both ends, a hole between (a huge corpus costs no disk here).
    # Read whole, it could never fit in memory; a run must stream it all the same.
    big = tmp_path / "corpus.txt"
    with big.open("wb") as handle:
        handle.write(b"the beginning " * 1000)  # more than the 8 KiB sniffed
        handle.truncate(1 << 40)
        handle.seek((1 << 40) - 6)
        handle.write(b"!end\n\n")
    stream = ByteStream(str(big), seq_len=16, batch_size=2)
    inputs, _ = next(stream)
    assert bytes(inputs[0].astype(np.uint8)) == b"the beginning th"
    assert bytes(inputs[1].astype(np.uint8)) == bytes(16)  # the middle of the hole
    assert stream.read((1 << 40) - 6, 10) == b"!end\n\nthe "  # its end, then around
