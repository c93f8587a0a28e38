"""xltop: `top` for test-time training on MLX."""

__version__ = "0.1.0"
