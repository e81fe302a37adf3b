"""Fixtures every test gets (shared helpers live in tests/helpers.py)."""
from __future__ import annotations

import mindspore as ms
import pytest


@pytest.fixture(scope="session", autouse=True)
def _graph_mode_by_default():
    """Tests and fixtures run in graph mode, the pipeline's (``runtime.graph_mode: true``)."""
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture(autouse=True)
def _graph_mode_after_each_test():
    """Whatever a test switches to, the next one starts in graph mode again: no module-level
    ``set_context`` and no leaked mode (one once broke a later module's gradient check)."""
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture
def pynative():
    """Run this test in PyNative mode (a few forward passes are cheaper than compiling them)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
