"""Scaling sweeps: one parameter varied per sweep, everything else at a fixed size, each point
timed like a main case (interleaved medians, fewer samples), plus the thread-scaling sweep
(every op at 1 and 2 threads). Sizes keep the slowest reference call near a second, so the
whole set runs in a few minutes."""
from dataclasses import dataclass
from typing import Callable, List

from cases import (Case, local_attention_case, map_case, prior_case, prototype_attention_case,
                   support_prototypes_case, kmeans_case)


@dataclass
class Sweep:
    name: str  # file stem of the plot
    title: str
    xlabel: str
    values: List
    case: Callable[[object], Case]
    log_x: bool = False


def all_sweeps(quick=False):
    if quick:  # two points each: the code paths and the plots, in seconds
        return [
            Sweep("prior_feature_size", "prior mask: feature size", "feature map side (pixels)", [20, 30],
                  lambda hw: prior_case(1, 1, 64, hw, 0.3)),
            Sweep("local_attention_fg", "local attention: foreground fraction", "foreground fraction (%)", [10, 50],
                  lambda f: local_attention_case(1, 32, 20, f / 100, "exclude")),
            Sweep("prototype_attention_prototypes", "prototype attention: prototypes", "prototypes P", [10, 70],
                  lambda p: prototype_attention_case(1, 2, 400, 32, p)),
        ]
    return [
        Sweep("prior_feature_size", "prior mask (B1 K1 C256, 30% fg): feature size", "feature map side (pixels)",
              [30, 45, 60, 90, 129], lambda hw: prior_case(1, 1, 256, hw, 0.3)),
        Sweep("prior_shots", "prior mask (B1 C256 60x60, 30% fg): shots", "shots K", [1, 2, 5, 10],
              lambda k: prior_case(1, k, 256, 60, 0.3)),
        Sweep("prior_channels", "prior mask (B1 K1 60x60, 30% fg): channels", "channels C", [64, 256, 1024, 2048],
              lambda c: prior_case(1, 1, c, 60, 0.3), log_x=True),
        Sweep("prior_fg", "prior mask (B1 K1 C256 60x60): foreground fraction", "foreground fraction (%)",
              [5, 10, 30, 50, 100], lambda f: prior_case(1, 1, 256, 60, f / 100)),
        Sweep("map_channels", "MAP PFENet mode (B8 60x60, mask 473): channels", "channels C", [64, 256, 1024, 2048],
              lambda c: map_case("mask", 8, c, 60, 473), log_x=True),
        Sweep("local_attention_feature_size", "local attention exclude (B1 C256, 30% fg): feature size",
              "feature map side (pixels)", [30, 45, 60, 90, 129],
              lambda hw: local_attention_case(1, 256, hw, 0.3, "exclude")),
        Sweep("local_attention_fg", "local attention exclude (B1 C256 60x60): foreground fraction",
              "foreground fraction (%)", [5, 10, 30, 50, 100],
              lambda f: local_attention_case(1, 256, 60, f / 100, "exclude")),
        Sweep("prototype_attention_prototypes", "prototype attention (B4 H8 N3600 D32): prototypes", "prototypes P",
              [10, 70, 128, 256, 512], lambda p: prototype_attention_case(4, 8, 3600, 32, p), log_x=True),
        Sweep("support_prototypes_shots", "UMTFSS support prototypes (C256 60x60, 30% fg): shots", "shots K",
              [1, 2, 5, 10], lambda k: support_prototypes_case(k, 256, 60, 0.3)),
    ]


def thread_cases(quick=False):
    """One representative case per op for the 1-vs-2-thread sweep."""
    if quick:
        return [map_case("mask", 2, 64, 30, 233), local_attention_case(1, 32, 20, 0.3, "exclude")]
    return [map_case("mask", 8, 256, 60, 473), prior_case(1, 1, 2048, 60, 0.3), kmeans_case(18000, 50, 32, 10),
            support_prototypes_case(5, 256, 60, 0.3), prototype_attention_case(4, 8, 3600, 32, 70),
            local_attention_case(1, 256, 60, 0.3, "exclude")]
