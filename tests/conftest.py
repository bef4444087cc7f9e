import importlib.util
from pathlib import Path

import pytest
import torch

import fsskern  # noqa: F401  (registers the ops)

# Tolerances the kernels are held to against the references (see README, "Ops").
FP32 = dict(rtol=1e-5, atol=1e-5)
FP64 = dict(rtol=1e-10, atol=1e-12)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def load_script(path: Path):
    """A script of python/ or benchmarks/ (a file, not a package module) loaded as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tol(dtype):
    return FP64 if dtype == torch.float64 else FP32


def rounded_once(dtype):
    """A float32 result rounded once to a 16-bit dtype, against the float32 value: half an ulp relative, plus
    float32's own noise. Sums accumulated in the 16-bit dtype land 10-100x further off."""
    return dict(rtol=float(torch.finfo(dtype).eps) / 2, atol=1e-6)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
