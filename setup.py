"""Builds fsskern._C: the C++ ops always, the CUDA kernels when torch is a CUDA build and a
CUDA toolkit is found (FSSKERN_CUDA=0/1 forces it off/on). FSSKERN_DEBUG=1 keeps debug info.

Install with `pip install --no-build-isolation .` so the extension compiles against the torch
already installed (see requirements.txt).
"""
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def find_cuda_toolkit():
    """The toolkit root, or None. torch's own guess follows `which nvcc`, which here is a
    wrapper script in /usr/local/bin and so yields /usr/local; look for a real bin/nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for root in candidates:
        if root and (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda.h").is_file():
            return root
    return None


def cuda_wanted(torch_cuda_version, toolkit):
    flag = os.environ.get("FSSKERN_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"FSSKERN_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    if flag == "1":
        if torch_cuda_version is None:
            raise SystemExit("FSSKERN_CUDA=1 but the installed torch is a CPU-only build")
        if toolkit is None:
            raise SystemExit("FSSKERN_CUDA=1 but no CUDA toolkit (bin/nvcc + include/cuda.h) was found; set CUDA_HOME")
        return True
    return torch_cuda_version is not None and toolkit is not None


# CUDA_HOME must be right before torch.utils.cpp_extension is imported: it reads it once.
TOOLKIT = find_cuda_toolkit()
if TOOLKIT:
    os.environ["CUDA_HOME"] = TOOLKIT

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = cuda_wanted(torch.version.cuda, TOOLKIT)
TORCH_RELEASE = torch.__version__.split("+")[0]  # 2.14.1+cu130 -> 2.14.1 (the local tag is not on the index)
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    # No GPU to ask: build for Ampere and Hopper (sm_80, sm_90) plus PTX for newer parts; older GPUs (V100, T4:
    # 7.0, 7.5) need TORCH_CUDA_ARCH_LIST set, or their launches fail with "no kernel image" (README, CUDA).
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

# csrc/simt is the CPU emulation of the CUDA kernels, built only by the tests (tests/simt_build.py).
cpp_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp") if "simt" not in p.relative_to(CSRC).parts)
cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu")) if WITH_CUDA else []

# -ffp-contract=off: no silent FMA contraction, so elementwise steps round as PyTorch's do.
# -g0 drops the -g that Python's own CFLAGS add: with it csrc/ops/cpu/attention_kernel.cpp took
# 84 s and a 7.8 MB object here, without it 41 s and 0.37 MB. FSSKERN_DEBUG=1 keeps it for gdb.
DEBUG = os.environ.get("FSSKERN_DEBUG", "") == "1"
# -std=c++20 stated, not left to torch: csrc needs it (std::bit_cast), torch 2.14's BuildExtension adds it, but
# older torch (2.11, the GPU machines' image) defaults to c++17 and adds its own only when no -std is given.
cxx_flags = ["-std=c++20", "-O3", "-fopenmp", "-ffp-contract=off", "-g" if DEBUG else "-g0"]
# The flags are recorded in the library (build_info) for the benchmark reports' machine header,
# joined by "_" so the define needs no quoting in any build tool.
cxx_flags += ["-DFSSKERN_WITH_CUDA=%d" % int(WITH_CUDA), "-DFSSKERN_CXX_FLAGS=" + "_".join(cxx_flags)]
nvcc_flags = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DFSSKERN_WITH_CUDA=1"]
# Per-operator ATen headers, as PyTorch's own kernels use them: each source includes
# ATen/core/Tensor.h and the ATen/ops/<op>.h it calls, never ATen/ATen.h (~35 s more per file
# here, with -g). This define keeps ATen/TensorOperators.h lean too, and arms the sources'
# TORCH_ASSERT_ONLY_METHOD_OPERATORS: an all-operators include becomes a compile error.
# Also in tests/simt_build.py, the Makefile's cuda-check and CMakeLists.txt.
cxx_flags.append("-DAT_PER_OPERATOR_HEADERS")
nvcc_flags.append("-DAT_PER_OPERATOR_HEADERS")
Extension = CUDAExtension if WITH_CUDA else CppExtension
ext = Extension(
    name="fsskern._C",
    sources=cpp_sources + cuda_sources,
    include_dirs=[str(CSRC)],
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if WITH_CUDA else {"cxx": cxx_flags},
    extra_link_args=["-fopenmp"],
    py_limited_api=True,
)

setup(
    name="fsskern",
    version="0.1.0",
    description="Fused C++/CUDA kernels for few-shot semantic segmentation, as PyTorch ops",
    packages=find_packages(include=["fsskern", "fsskern.*"]),
    python_requires=">=3.10",
    # _C.so is bound to the ABI of the torch it compiled against: pin that one, so pip never installs another
    # torch over it (a fixed 2.14.1 replaced a user's 2.11 after building against it); torchvision follows torch
    install_requires=[f"torch=={TORCH_RELEASE}", "torchvision", "numpy", "pillow", "opencv-python-headless",
                      "pyyaml", "tqdm", "tensorboard", "pycocotools"],
    extras_require={"umtfss": ["faiss-cpu", "scikit-image"]},  # stage A only (fsskern/pseudo_tasks.py)
    entry_points={"console_scripts": ["fsskern-train=fsskern.engine.cli:train_main",
                                      "fsskern-evaluate=fsskern.engine.cli:evaluate_main"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
