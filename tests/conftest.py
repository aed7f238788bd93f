"""Shared test set-up.

Without a CUDA device, Triton kernels run through Triton's interpreter on CPU tensors; the
variable must be set before triton is first imported, which is why it lives here.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns on every compile when this is unset; 1 is its default behaviour.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: Sequences longer than this get a short explanation when an `==` between them fails.
LONG_SEQUENCE = 256


def pytest_assertrepr_compare(config, op, left, right):
    """A failed `==` between long sequences: their lengths and the first difference, not
    pytest's full diff. Under CI=true pytest always builds that diff with difflib, quadratic in
    the length: one failing comparison of two 2,000-row lists ran for most of CI's hour."""
    if op != "==" or not all(isinstance(side, (list, tuple)) for side in (left, right)):
        return None
    if max(len(left), len(right)) <= LONG_SEQUENCE:
        return None
    first = next((i for i, (a, b) in enumerate(zip(left, right)) if a != b), min(len(left), len(right)))
    shown = f"{left[first]!r} != {right[first]!r}" if first < min(len(left), len(right)) else "one ends there"
    return [f"{type(left).__name__} of {len(left)} == {type(right).__name__} of {len(right)}",
            f"first difference at index {first}: {shown}"]


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so a failure reproduces."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
