"""Test setup: Triton kernels run through the interpreter on CPU; generated code goes to a temp cache."""

import os
import shutil
import sys
import tempfile

import pytest

_cache = os.environ.setdefault("ATTNCOMPILER_CACHE_DIR", tempfile.mkdtemp(prefix="attncompiler-test-cache-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker keeps its own tuning results and kernels (a test that clears its tuning results must not
    # clear another worker's mid-test); the models converted from GGUF files stay shared (25 s each).
    _own = os.path.join(_cache, os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(os.path.join(_cache, "models"), exist_ok=True)
    os.makedirs(_own, exist_ok=True)
    if not os.path.lexists(os.path.join(_own, "models")):
        os.symlink(os.path.join(_cache, "models"), os.path.join(_own, "models"))
    os.environ["ATTNCOMPILER_CACHE_DIR"] = _own
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/

import torch  # noqa: E402

if not torch.cuda.is_available():  # CPU: run the Triton kernels through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attncompiler  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_calls():
    """The op's run counters, cleared before the test."""
    attncompiler.KERNEL_CALLS.clear()
    return attncompiler.KERNEL_CALLS


@pytest.fixture
def no_tuning_results():
    """The test starts and ends without tuning results (generated kernels stay where the session put them)."""
    from attncompiler import tuner
    from attncompiler.cache import tuning_dir
    from attncompiler.options import Options

    shutil.rmtree(tuning_dir(), ignore_errors=True)
    tuner.forget_caches()
    yield
    tuner.configure(Options.resolve())
    tuner.forget_caches()
    shutil.rmtree(tuning_dir(), ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
