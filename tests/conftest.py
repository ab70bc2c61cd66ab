"""Test setup: Triton kernels run through the interpreter on CPU; generated code goes to a temp cache."""

import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("ATTNCOMPILER_CACHE_DIR", tempfile.mkdtemp(prefix="attncompiler-test-cache-"))
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
