"""Benchmark cases: every fsskern op against its pure-PyTorch reference at the papers' sizes.

A case builds its inputs once (seeded) and times two forward calls: the reference as the public
FSS code writes it, and the fsskern op. Targets come from the issue that introduced the op.
"""
import importlib.util
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from fsskern import ops, reference


@dataclass
class Work:
    """What one fsskern call does, for the roofline: `amount` flops ("flop") or bytes moved
    ("byte"); `gemm` the (m, k, n) of a torch.mm doing GEMM work of the same shape, whose speed
    on this machine is the flop limit (the copy bandwidth is the byte limit)."""
    kind: str
    amount: float
    gemm: Optional[Tuple[int, int, int]] = None


@dataclass
class Case:
    name: str
    op: str
    size: str
    build: Callable[[], dict]  # -> inputs
    reference: Callable[[dict], torch.Tensor]
    fsskern: Callable[[dict], torch.Tensor]
    speedup_target: Optional[float] = None  # reference time / fsskern time, at least
    memory_target: Optional[float] = None  # fsskern extra memory / reference extra memory, at most
    time_target_ms: Optional[float] = None  # fsskern time, at most
    peers: Dict[str, Callable[[dict], object]] = field(default_factory=dict)  # timed beside, not compared
    peer_targets: Dict[str, float] = field(default_factory=dict)  # peer time / fsskern time, at least
    work: Optional[Callable[[dict], Work]] = None


def exact_fraction_masks(shape, fraction, generator):
    """Masks with exactly round(fraction * H * W) foreground pixels per (image, shot)."""
    *lead, H, W = shape
    scores = torch.rand(*lead, H * W, generator=generator)
    k = round(fraction * H * W)
    masks = torch.zeros(*lead, H * W)
    if k:
        masks.scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)
    return masks.view(shape)


def map_case(mode, B, C, h, H):
    def build():
        g = torch.Generator().manual_seed(0)
        return {"features": torch.randn(B, C, h, h, generator=g),
                "masks": (torch.rand(B, 1, H, H, generator=g) < 0.3).float()}

    if mode == "mask":
        ref = lambda x: reference.weighted_gap(x["features"], x["masks"])  # noqa: E731
        name, target = "MAP PFENet mode", 2.0
    else:
        ref = lambda x: reference.panet_masked_average_pool(x["features"], x["masks"][:, 0])  # noqa: E731
        name, target = "MAP PANet mode", 500.0
    return Case(name=name, op="masked_average_pool", size=f"B{B} C{C} feat {h}x{h} mask {H}x{H}",
                build=build, reference=ref,
                fsskern=lambda x: ops.masked_average_pool(x["features"], x["masks"], resize=mode),
                speedup_target=target,
                work=lambda x: Work("byte", x["features"].numel() * 4 + x["masks"].numel() * 4))


def prior_case(B, K, C, hw, fraction, search_dtype=None):
    """search_dtype=torch.bfloat16: the certified bf16 search (issue 21), which runs where the device has bf16
    hardware (AMX-BF16 / AVX512-BF16, tensor cores) and is the fp32 kernel elsewhere; same outputs either way."""
    def build():
        g = torch.Generator().manual_seed(0)
        return {"query": torch.randn(B, C, hw, hw, generator=g).relu_(),  # post-ReLU layer4 features
                "support": torch.randn(B, K, C, hw, hw, generator=g).relu_(),
                "masks": exact_fraction_masks((B, K, hw, hw), fraction, g)}

    bf16 = search_dtype == torch.bfloat16
    return Case(name=f"prior {K}-shot {round(fraction * 100)}% fg" + (" bf16 search" if bf16 else ""), op="prior_mask",
                size=f"B{B} C{C} {hw}x{hw} K{K}", build=build,
                reference=lambda x: reference.prior_mask(x["query"], x["support"], x["masks"]),
                fsskern=lambda x: ops.prior_mask(x["query"], x["support"], x["masks"], search_dtype=search_dtype),
                speedup_target=5.0 if bf16 else 2.5, memory_target=0.05, work=lambda x: prior_work(x["masks"], C, hw))


def prior_work(masks, C, hw):
    """GEMM flops over the foreground support pixels (what fsskern computes)."""
    fg = int(masks.count_nonzero())
    n_fg = max(fg // (masks.shape[0] * masks.shape[1]), 1)
    return Work("flop", 2.0 * fg * hw * hw * C, gemm=(n_fg, C, hw * hw))


class KeopsMaxCosine:
    """pykeops peer for the max-cosine reduction: a LazyTensor formula over the foreground support
    pixels (compacted, the fastest way to hand them to KeOps), reduced with max over them. Its
    one-time compile is timed separately: the formula compiles into a fresh build folder on the
    first call (`first_call_s`)."""

    def __init__(self):
        self.first_call_s = None

    def __call__(self, x):
        import pykeops
        from pykeops.torch import LazyTensor
        if self.first_call_s is None:
            pykeops.set_build_folder(tempfile.mkdtemp(prefix="fsskern-keops-"))
            start = time.perf_counter()
            out = self._run(x, LazyTensor)
            self.first_call_s = time.perf_counter() - start
            return out
        return self._run(x, LazyTensor)

    @staticmethod
    def _run(x, LazyTensor):
        query, support, masks = x["query"], x["support"], x["masks"]
        B, K, C = support.shape[:3]
        outs = []
        for b in range(B):
            q = query[b].flatten(1).T.contiguous()  # (Nq, C)
            for k in range(K):
                s = support[b, k].flatten(1).T[masks[b, k].flatten() > 0].contiguous()  # (Nfg, C)
                cos = (LazyTensor(s[:, None, :]) | LazyTensor(q[None, :, :])) / (
                    LazyTensor(s.norm(dim=1, keepdim=True)[:, None, :]) *
                    LazyTensor(q.norm(dim=1, keepdim=True)[None, :, :]) + 1e-7)
                outs.append(cos.max(dim=0))
        return outs


def max_cosine_case(B, K, C, hw, fraction, keops=True):
    """The max-cosine core of the prior (no normalisation, no resize), with pykeops as peer."""
    def build():
        g = torch.Generator().manual_seed(0)
        return {"query": torch.randn(B, C, hw, hw, generator=g).relu_(),
                "support": torch.randn(B, K, C, hw, hw, generator=g).relu_(),
                "masks": exact_fraction_masks((B, K, hw, hw), fraction, g)}

    peers = {"pykeops LazyTensor": KeopsMaxCosine()} if keops and importlib.util.find_spec("pykeops") else {}
    return Case(name=f"max-cosine core {round(fraction * 100)}% fg", op="max_cosine", size=f"B{B} C{C} {hw}x{hw} K{K}",
                build=build,
                reference=lambda x: reference.prior_mask(x["query"], x["support"], x["masks"], normalize=False,
                                                         reduce=None),
                fsskern=lambda x: ops.max_cosine(x["query"].flatten(2), x["support"].flatten(3),
                                                 x["masks"].flatten(2))[0],
                peers=peers, work=lambda x: prior_work(x["masks"], C, hw))


FAISS_CPU = "faiss-cpu IndexBinaryFlat"  # a CPU library: not a peer of a GPU run


def faiss_hamming_kmeans(codes, k, iters, init):
    """The same k-means built from faiss-cpu: IndexBinaryFlat finds the nearest centroid (the
    fastest exact Hamming search faiss has), numpy takes the majority vote."""
    import faiss
    import numpy as np
    packed = codes.numpy().astype("<i8").view(np.uint8).reshape(-1, 8)
    bits = np.unpackbits(packed, axis=1, bitorder="little").astype(np.float32)  # (N, 64)
    centroids = packed[init.numpy()].copy()
    for it in range(iters + 1):
        index = faiss.IndexBinaryFlat(64)
        index.add(centroids)
        _, assign = index.search(packed, 1)
        assign = assign[:, 0]
        if it == iters:
            return assign
        one_hot = np.zeros((k, len(assign)), np.float32)
        one_hot[assign, np.arange(len(assign))] = 1
        counts = one_hot.sum(1, keepdims=True)
        ones = one_hot @ bits  # (k, 64) set bits per cluster, one BLAS call
        old = np.unpackbits(centroids, axis=1, bitorder="little")
        new = np.where(2 * ones > counts, 1, np.where(2 * ones < counts, 0, old))
        centroids = np.packbits(np.where(counts > 0, new, old).astype(np.uint8), axis=1, bitorder="little")


def kmeans_case(N, k, bits, iters):
    def build():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, 256, generator=g)
        codes = ops.lsh_hash(x, ops.lsh_planes(bits, 256, generator=g)).view(1, N)
        valid = torch.ones(1, N, dtype=torch.bool)
        return {"codes": codes, "valid": valid, "init": ops.draw_init(valid, k, g)}

    return Case(name="Hamming k-means", op="hamming_kmeans", size=f"N{N} {bits} bits k{k} {iters} iters",
                build=build,
                reference=lambda x: reference.clustering.hamming_kmeans(x["codes"], k, iters, x["valid"], x["init"]),
                fsskern=lambda x: ops.hamming_kmeans(x["codes"], k, iters=iters, valid=x["valid"], init=x["init"]),
                speedup_target=20.0,
                work=lambda x: Work("byte", 2.0 * 8 * N * (iters + 1)),
                peers={FAISS_CPU: lambda x: faiss_hamming_kmeans(x["codes"][0], k, iters, x["init"][0])})


def umtfss_reference_prototypes(features, masks, k_fg=20, k_bg=50, bits=32, iters=10, seed=0):
    """UMTFSS's prototype pipeline from the pure-PyTorch pieces (fp32 hashing as in the repo)."""
    g = torch.Generator().manual_seed(seed)
    B, K, C, h, w = features.shape
    fg = (torch.nn.functional.interpolate(masks, size=(h, w), mode="bilinear", align_corners=True) >= 0.5)
    tokens = features.permute(0, 1, 3, 4, 2).reshape(B, -1, C)
    codes = reference.clustering.lsh_hash(tokens, ops.lsh_planes(bits, C, generator=g, device=features.device))
    protos = []
    for k, part in ((k_fg, fg.reshape(B, -1)), (k_bg, ~fg.reshape(B, -1))):
        assign, _, _ = reference.clustering.hamming_kmeans(codes, k, iters, part, ops.draw_init(part, k, g))
        protos.append(reference.clustering.cluster_means(tokens, assign, k)[0])
    return torch.nn.functional.normalize(torch.cat(protos, 1), dim=-1)


def support_prototypes_case(K, C, hw, fraction):
    def build():
        g = torch.Generator().manual_seed(0)
        return {"features": torch.randn(1, K, C, hw, hw, generator=g),
                "masks": exact_fraction_masks((1, K, hw, hw), fraction, g)}

    return Case(name="UMTFSS support prototypes", op="support_prototypes",
                size=f"{K} shots C{C} {hw}x{hw} k 20+50 {round(fraction * 100)}% fg", build=build,
                reference=lambda x: umtfss_reference_prototypes(x["features"], x["masks"]),
                fsskern=lambda x: ops.support_prototypes(x["features"], x["masks"],
                                                         generator=torch.Generator().manual_seed(0))[0],
                time_target_ms=10.0,
                work=lambda x: Work("flop", 2.0 * K * hw * hw * C * 32, gemm=(K * hw * hw, C, 32)))


def bf16_autocast(case: Case, tensors) -> Case:
    """``case`` with the fsskern side under bf16 autocast (the inputs' device's) on bf16 copies of ``tensors`` (as
    a model's layers hand them over) and the float32 kernel as a peer: issue 21's target is bf16 >= 1.5x the float32
    kernel."""
    build, fp32 = case.build, case.fsskern

    def build_bf16():
        x = build()
        return {**x, **{f"{n}_bf16": x[n].bfloat16() for n in tensors}}

    def bf16(x):
        with torch.autocast(x[tensors[0]].device.type, dtype=torch.bfloat16):  # CUDA's under --device cuda
            return fp32({**x, **{n: x[f"{n}_bf16"] for n in tensors}})

    case.name, case.build, case.fsskern = case.name + " bf16 autocast", build_bf16, bf16
    case.speedup_target = case.memory_target = None
    case.peers, case.peer_targets = {"fsskern float32 kernel": fp32}, {"fsskern float32 kernel": 1.5}
    return case


def prototype_attention_case(B, H, N, D, P, dropout_p=0.0):
    def build():
        g = torch.Generator().manual_seed(0)
        valid = torch.rand(B, P, generator=g) < 0.9  # UMTFSS pads and marks a few prototypes invalid
        valid[:, 0] = True
        return {"q": torch.randn(B, H, N, D, generator=g), "k": torch.randn(B, H, P, D, generator=g),
                "v": torch.randn(B, H, P, D, generator=g), "valid": valid}

    peers, peer_targets = {}, {}
    if dropout_p == 0:
        sdpa = "torch SDPA, bool mask"
        peers[sdpa] = lambda x: torch.nn.functional.scaled_dot_product_attention(
            x["q"], x["k"], x["v"], attn_mask=x["valid"][:, None, None, :])
        peer_targets[sdpa] = 1.0
    return Case(name="prototype attention" + (f" dropout {dropout_p:g}" if dropout_p else ""),
                op="prototype_attention", size=f"B{B} H{H} N{N} D{D} P{P}", build=build,
                reference=lambda x: reference.attention.prototype_attention(x["q"], x["k"], x["v"], x["valid"],
                                                                            dropout_p=dropout_p),
                fsskern=lambda x: ops.prototype_attention(x["q"], x["k"], x["v"], key_valid=x["valid"],
                                                          dropout_p=dropout_p, seed=0),
                speedup_target=None if dropout_p else 2.0, memory_target=None if dropout_p else 0.5,
                peers=peers, peer_targets=peer_targets,
                work=lambda x: Work("flop", 4.0 * H * N * D * int(x["valid"].sum()), gemm=(N, D, P)))


def local_attention_case(B, C, hw, fraction, mode):
    def build():
        g = torch.Generator().manual_seed(0)
        return {"query": torch.randn(B, C, hw * hw, generator=g).relu_(),
                "support": torch.randn(B, C, hw * hw, generator=g).relu_(),
                "mask": exact_fraction_masks((B, hw, hw), fraction, g).view(B, -1)}

    return Case(name=f"local attention {mode}", op="local_conditional_attention",
                size=f"B{B} C{C} {hw}x{hw} {round(fraction * 100)}% fg", build=build,
                reference=lambda x: reference.attention.local_conditional_attention(x["query"], x["support"],
                                                                                    x["mask"], None, mode),
                fsskern=lambda x: ops.local_conditional_attention(x["query"], x["support"], x["mask"], mode=mode),
                speedup_target=3.0, memory_target=0.05,
                work=lambda x: Work("flop", 4.0 * hw * hw * C * int(x["mask"].sum()),
                                    gemm=(hw * hw, C, max(int(x["mask"].sum()) // B, 1))))


def all_cases(quick=False, device="cpu"):
    """The cases at the papers' sizes (quick: CI smoke sizes); on a CUDA device without the
    CPU-only peers."""
    cases = _cases(quick)
    if torch.device(device).type == "cuda":
        for case in cases:
            case.peers.pop(FAISS_CPU, None)
            case.peer_targets.pop(FAISS_CPU, None)
    return cases


def _cases(quick):
    if quick:  # CI smoke sizes: every op, seconds in all; the targets are for the papers' sizes
        cases = [map_case("mask", 2, 64, 30, 233), map_case("features", 2, 128, 27, 209),
                 prior_case(1, 1, 256, 30, 0.3), prior_case(1, 2, 256, 30, 0.5), kmeans_case(2000, 20, 32, 3),
                 support_prototypes_case(2, 64, 20, 0.3), prototype_attention_case(1, 2, 400, 32, 20),
                 local_attention_case(1, 32, 20, 0.3, "exclude"), local_attention_case(1, 32, 20, 0.3, "multiply"),
                 max_cosine_case(1, 1, 64, 20, 0.3), prior_case(1, 1, 256, 30, 0.5, search_dtype=torch.bfloat16),
                 bf16_autocast(local_attention_case(1, 32, 20, 0.3, "exclude"), ["query", "support"])]
        for case in cases:
            case.speedup_target = case.memory_target = case.time_target_ms = None
            case.peer_targets = {}
        return cases
    return [
        map_case("mask", 8, 256, 60, 473),
        map_case("features", 5, 1536, 53, 417),
        prior_case(4, 1, 2048, 60, 0.3),
        prior_case(4, 1, 2048, 60, 0.5),
        prior_case(4, 5, 2048, 60, 0.5),
        prior_case(4, 1, 2048, 60, 0.5, search_dtype=torch.bfloat16),
        max_cosine_case(1, 1, 256, 60, 0.3),
        kmeans_case(18000, 50, 32, 10),
        support_prototypes_case(5, 256, 60, 0.3),
        prototype_attention_case(4, 8, 3600, 32, 70),
        prototype_attention_case(4, 8, 3600, 32, 70, dropout_p=0.1),
        local_attention_case(4, 256, 60, 0.3, "exclude"),
        local_attention_case(4, 256, 60, 0.3, "multiply"),
        bf16_autocast(prototype_attention_case(4, 8, 3600, 32, 70), ["q", "k", "v"]),
        bf16_autocast(local_attention_case(4, 256, 60, 0.3, "exclude"), ["query", "support"]),
    ]
