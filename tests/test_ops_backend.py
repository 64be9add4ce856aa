"""`ops.backend(name)`: the kernel backend for a block, the caller's selection restored after
it — including "unset" (follow $LDM_KERNELS) and when the block raises."""

import pytest

from ldm_fast import ops


def test_backend_block_restores_the_previous_selection(monkeypatch):
    monkeypatch.setenv("LDM_KERNELS", "eager")
    ops.set_backend(None)
    with ops.backend("triton"):
        assert ops.get_backend() == "triton"
        with ops.backend("auto"):
            assert ops.get_backend() == "auto"
        assert ops.get_backend() == "triton"
    assert ops._backend is None and ops.get_backend() == "eager"  # unset again, not pinned to "eager"
    with pytest.raises(RuntimeError), ops.backend("triton"):
        raise RuntimeError("inside")
    assert ops._backend is None
    with ops.backend(None):  # None keeps the current selection
        assert ops.get_backend() == "eager"
    with pytest.raises(ValueError, match="kernels"), ops.backend("cuda"):
        pass
    assert ops._backend is None
