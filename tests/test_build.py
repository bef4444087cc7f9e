"""What the build contains, and the CUDA kernels against the CPU ones where a GPU exists."""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import fsskern
from conftest import CUDA, FP32
from fsskern import ops

OPS = ["masked_average_pool", "_masked_average_pool_backward_features", "_masked_average_pool_backward_masks",
       "max_cosine", "_max_cosine_backward", "lsh_hash", "hamming_kmeans", "cluster_means", "_cluster_means_backward",
       "prototype_attention", "_prototype_attention_backward", "local_conditional_attention",
       "_local_conditional_attention_backward"]


def test_build_info():
    info = fsskern.build_info()
    assert set(info) == {"bf16_search", "bf16_attention", "cuda", "cpu_dispatch", "compiler", "cxx_flags"}
    assert "default" in info["cpu_dispatch"]
    assert {"-ffp-contract=off", "-std=c++20"} <= set(info["cxx_flags"].split())


def test_build_info_names_the_bf16_products_path():
    # AMX-BF16 CPUs run the attention kernels' bf16 products on the tile units, other AVX512-BF16 ones on vdpbf16ps
    info = fsskern.build_info()
    if not torch.ops.fsskern._bf16_products():
        assert info["bf16_attention"] == "float32 (bf16 inputs widened)"
    elif torch.cpu._is_amx_tile_supported():
        assert info["bf16_attention"] == "bf16 products (AMX-BF16, oneDNN's brgemm)"
    else:
        assert info["bf16_attention"] == "bf16 products (AVX512-BF16, fsskern's vdpbf16ps GEMM)"


@pytest.mark.parametrize("name", OPS)
def test_ops_registered_with_cpu_kernels(name):
    name = getattr(torch.ops.fsskern, name).default.name()
    if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"):
        return  # one ATen implementation serves every device
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    if fsskern.build_info()["cuda"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("mode", ["mask", "features"])
def test_cuda_masked_average_pool_matches_cpu(mode):
    f = torch.randn(3, 64, 13, 17, requires_grad=True)
    m = torch.rand(3, 4, 97, 101, requires_grad=True)
    fc, mc = f.detach().cuda().requires_grad_(), m.detach().cuda().requires_grad_()
    out, out_c = ops.masked_average_pool(f, m, resize=mode), ops.masked_average_pool(fc, mc, resize=mode)
    assert_close(out_c.cpu(), out, **FP32)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (f, m), g), torch.autograd.grad(out_c, (fc, mc), g.cuda())):
        assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("fg", [0.0, 0.3, 1.0])
def test_cuda_prior_matches_cpu(fg):
    q = torch.randn(2, 96, 21, 19, requires_grad=True)
    s = torch.randn(2, 3, 96, 17, 23, requires_grad=True)
    m = (torch.rand(2, 3, 60, 60) < fg).float()
    qc, sc = q.detach().cuda().requires_grad_(), s.detach().cuda().requires_grad_()
    out, out_c = ops.prior_mask(q, s, m, reduce=None), ops.prior_mask(qc, sc, m.cuda(), reduce=None)
    assert_close(out_c.cpu(), out, **FP32)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, s), g), torch.autograd.grad(out_c, (qc, sc), g.cuda())):
        assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@CUDA
def test_cuda_clustering_identical_to_cpu():
    x = torch.randn(3000, 256)
    planes = ops.lsh_planes(32, 256)
    codes = ops.lsh_hash(x, planes)
    assert torch.equal(ops.lsh_hash(x.cuda(), planes.cuda()).cpu(), codes)
    codes = codes.view(2, 1500)
    valid = torch.rand(2, 1500) < 0.6
    init = ops.draw_init(valid, 20, torch.Generator().manual_seed(0))
    cpu = ops.hamming_kmeans(codes, 20, valid=valid, init=init)
    gpu = ops.hamming_kmeans(codes.cuda(), 20, valid=valid.cuda(), init=init.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    f = torch.randn(2, 1500, 64)
    means, counts = ops.cluster_means(f, cpu[0], 20)
    means_c, counts_c = ops.cluster_means(f.cuda(), cpu[0].cuda(), 20)
    assert_close(means_c.cpu(), means, **FP32)
    assert torch.equal(counts_c.cpu(), counts)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("mode", ["exclude", "multiply"])
def test_cuda_attention_matches_cpu(mode):
    q, k, v = (torch.randn(2, 4, 300, 32, requires_grad=True), torch.randn(2, 4, 70, 32, requires_grad=True),
               torch.randn(2, 4, 70, 32, requires_grad=True))
    valid = torch.rand(2, 70) < 0.8
    cuda = [t.detach().cuda().requires_grad_() for t in (q, k, v)]
    out = ops.prototype_attention(q, k, v, key_valid=valid, dropout_p=0.1, seed=3)
    out_c = ops.prototype_attention(*cuda, key_valid=valid.cuda(), dropout_p=0.1, seed=3)
    assert_close(out_c.cpu(), out, **FP32)  # the same dropout mask on both devices
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(out_c, cuda, g.cuda())):
        assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
    query, support = torch.randn(2, 64, 500, requires_grad=True), torch.randn(2, 64, 700, requires_grad=True)
    mask = torch.rand(2, 700) < 0.3
    qc, sc = query.detach().cuda().requires_grad_(), support.detach().cuda().requires_grad_()
    out = ops.local_conditional_attention(query, support, mask, mode=mode)
    out_c = ops.local_conditional_attention(qc, sc, mask.cuda(), mode=mode)
    assert_close(out_c.cpu(), out, **FP32)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (query, support), g), torch.autograd.grad(out_c, (qc, sc), g.cuda())):
        assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


def test_sdist_carries_what_the_extension_includes(tmp_path):
    """An sdist builds elsewhere only if it holds every header the sources include (setuptools adds the sources of
    ext_modules, not their headers: MANIFEST.in grafts csrc), and it pins the torch the build ran against."""
    root = Path(__file__).parents[1]
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=root,
                         env={**os.environ, "FSSKERN_CUDA": "0"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with tarfile.open(next(tmp_path.glob("fsskern-*.tar.gz"))) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    for source in (root / "csrc").rglob("*"):
        if source.suffix in (".cpp", ".cu", ".h", ".cuh"):
            for header in re.findall(r'#include\s+"([^"]+)"', source.read_text()):
                near = source.parent.relative_to(root) / header
                assert str(near) in names or f"csrc/{header}" in names, (source, header)
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}" in pkg_info
