"""The TTT runtime: layers, model, streams, the run loop, telemetry, SWAR.

Kept import-light on purpose: `xltop` imports `ttt_runtime.channel` and `ttt_runtime.config`,
which must not pull in MLX (the UI process never imports it).
"""

__version__ = "0.1.0"
