"""Builds the SIMT emulation of fsskern's CUDA kernels (test-only): the same launchers and
kernel headers as the nvcc build, compiled by the host compiler with FSSKERN_SIMT, registered
as torch.ops.fsskern_simt.* for CPU tensors. Built once, cached in build/simt."""
import functools
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "simt"


def cuda_sources():
    return sorted((CSRC / "ops" / "cuda").glob("*.cu"))


def wrap_as_cpp(source: Path) -> Path:
    """A .cpp that includes the .cu, so the host compiler (not nvcc) compiles it unchanged."""
    BUILD.mkdir(parents=True, exist_ok=True)
    wrapper = BUILD / f"{source.parent.name}_{source.stem}.cpp"
    text = f'#include "{source}"\n'
    if not wrapper.exists() or wrapper.read_text() != text:
        wrapper.write_text(text)
    return wrapper


@functools.lru_cache(maxsize=None)
def load_simt():
    sources = [CSRC / "fsskern.cpp", *sorted((CSRC / "ops").glob("*.cpp")), *sorted((CSRC / "simt").glob("*.cpp"))]
    sources += [wrap_as_cpp(s) for s in cuda_sources()]
    sources.append(wrap_as_cpp(ROOT / "tests" / "simt" / "planted_kernels.cu"))
    load(name="fsskern_simt", sources=[str(s) for s in sources], build_directory=str(BUILD),
         extra_include_paths=[str(CSRC)], is_python_module=False, verbose=False,
         extra_cflags=["-O2", "-DFSSKERN_SIMT", "-ffp-contract=off", "-std=c++20",
                       "-DAT_PER_OPERATOR_HEADERS"])  # lean ATen headers (see setup.py)
    return torch.ops.fsskern_simt
