"""`reset`: the no-memory baseline. Every chunk starts from the base's initial fast weights, so
nothing of one chunk reaches the next; the outer weights stay those of the base."""

from __future__ import annotations

from ttt_runtime.adapt.method import Method


class Reset(Method):
    name = "reset"
    carries_fast_weights = False
