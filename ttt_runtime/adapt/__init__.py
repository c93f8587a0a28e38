"""Test-time adaptation methods for adapt mode (`--adapt-method`, docs/adaptation.md): one
module each, all stepped through `method.Method` by the adapt learner."""

from __future__ import annotations

from ttt_runtime.adapt.dynamic import Dynamic
from ttt_runtime.adapt.lora import Lora
from ttt_runtime.adapt.method import Method, MethodUnavailable
from ttt_runtime.adapt.reset import Reset
from ttt_runtime.adapt.tent import Tent
from ttt_runtime.adapt.ttt import TTT
from ttt_runtime.adapt.ttt_plus import TTTPlusPlus

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (TTT, Reset, Dynamic, Lora, Tent, TTTPlusPlus)
}  # by RunConfig.adapt_method

__all__ = ["METHODS", "Method", "MethodUnavailable"]
