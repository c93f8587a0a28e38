"""TTT-Linear and TTT-MLP layers on MLX, exactly as docs/ttt-maths.md."""

from ttt_runtime.config import TTTLayerConfig
from ttt_runtime.layers.cache import TTTCache
from ttt_runtime.layers.linear import TTTLinear
from ttt_runtime.layers.mlp import TTTMLP

__all__ = ["TTTCache", "TTTLayerConfig", "TTTLinear", "TTTMLP"]
