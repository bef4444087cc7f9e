"""Benchmark cases: every fsskern op against its pure-PyTorch reference at the papers' sizes.

A case builds its inputs once (seeded) and times two forward calls: the reference as the public
FSS code writes it, and the fsskern op. Targets come from the issue that introduced the op.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fsskern import ops, reference


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
                speedup_target=target)


def prior_case(B, K, C, hw, fraction):
    def build():
        g = torch.Generator().manual_seed(0)
        return {"query": torch.randn(B, C, hw, hw, generator=g).relu_(),  # post-ReLU layer4 features
                "support": torch.randn(B, K, C, hw, hw, generator=g).relu_(),
                "masks": exact_fraction_masks((B, K, hw, hw), fraction, g)}

    return Case(name=f"prior {K}-shot {round(fraction * 100)}% fg", op="prior_mask",
                size=f"B{B} C{C} {hw}x{hw} K{K}", build=build,
                reference=lambda x: reference.prior_mask(x["query"], x["support"], x["masks"]),
                fsskern=lambda x: ops.prior_mask(x["query"], x["support"], x["masks"]),
                speedup_target=2.5, memory_target=0.05)


def all_cases(quick=False):
    if quick:  # CI smoke sizes: every op, seconds in all; the targets are for the papers' sizes
        cases = [map_case("mask", 2, 64, 30, 233), map_case("features", 2, 128, 27, 209),
                 prior_case(1, 1, 256, 30, 0.3), prior_case(1, 2, 256, 30, 0.5)]
        for case in cases:
            case.speedup_target = case.memory_target = None
        return cases
    return [
        map_case("mask", 8, 256, 60, 473),
        map_case("features", 5, 1536, 53, 417),
        prior_case(4, 1, 2048, 60, 0.3),
        prior_case(4, 1, 2048, 60, 0.5),
        prior_case(4, 5, 2048, 60, 0.3),
        prior_case(4, 5, 2048, 60, 0.5),
        prior_case(1, 1, 2048, 129, 0.3),
    ]
