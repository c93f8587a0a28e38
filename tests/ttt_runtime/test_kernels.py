"""kernels/ (unused by the layers): sources are found, none on the CPU, the GPU kernel is right."""

import mlx.core as mx
import numpy as np
import pytest
import ttt_reference_numpy as ref

from ttt_runtime import kernels


def test_kernel_sources_are_found_for_every_backend():
    for relative in ("metal/ln_l2_grad.metal", "cuda/ln_l2_grad.cu"):
        assert "ROWS_PER_HEAD" in kernels.kernel_source(relative)


def test_missing_kernel_source_names_the_file():
    with pytest.raises(FileNotFoundError, match="nope.cu"):
        kernels.kernel_source("cuda/nope.cu")


@pytest.mark.skipif(kernels.custom_kernel_backend() is not None, reason="has a GPU backend")
def test_cpu_backend_has_no_custom_kernel():
    assert kernels.fused_ln_l2_grad() is None


@pytest.mark.skipif(kernels.custom_kernel_backend() is None, reason="needs MLX's Metal or CUDA")
def test_fused_ln_l2_grad_matches_the_spec_on_the_gpu():
    rng = np.random.default_rng(0)
    z, target = rng.normal(size=(2, 2, 4, 16, 64)), rng.normal(size=(2, 2, 4, 16, 64))
    gamma, beta = rng.normal(size=(4, 64)), rng.normal(size=(4, 64))
    expected = ref.ln_l2_grad(z, target, gamma[:, None, :], beta[:, None, :])

    fused = kernels.fused_ln_l2_grad()
    got = fused(*(mx.array(a, dtype=mx.float32) for a in (z, target, gamma, beta)))
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-4, atol=1e-5)
