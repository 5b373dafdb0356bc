"""Tests that need a CUDA device: marked ``gpu`` and skipped cleanly where CUDA is absent.

Run them with ``pytest -q tests/gpu`` (or ``-m gpu``) on a machine with a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasd import device

_HERE = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)
            if not device.cuda_available():
                item.add_marker(skip)


@pytest.fixture
def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()
