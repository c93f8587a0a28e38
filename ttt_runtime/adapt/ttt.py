"""`ttt`: TTT's own inner loop and nothing more. The fast weights carry from chunk to chunk (one
long conversation until `reset`); the outer weights stay those of the base."""

from __future__ import annotations

from ttt_runtime.adapt.method import Method


class TTT(Method):
    name = "ttt"
