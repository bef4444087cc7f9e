import pytest
import torch

import fsskern  # noqa: F401  (registers the ops)

# Tolerances the kernels are held to against the references (see README, "Ops").
FP32 = dict(rtol=1e-5, atol=1e-5)
FP64 = dict(rtol=1e-10, atol=1e-12)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tol(dtype):
    return FP64 if dtype == torch.float64 else FP32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
