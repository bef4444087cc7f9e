import torch


def build_info() -> dict:
    """What the compiled library contains, e.g. ``{"cuda": True, "cpu_dispatch": [...]}``."""
    raw = torch.ops.fsskern._build_info()
    info = dict(item.split("=", 1) for item in raw.split(";"))
    return {
        "cuda": info["cuda"] == "1",
        "cpu_dispatch": info["cpu_dispatch"].split(","),
        "compiler": info["compiler"],
        "cxx_flags": info.get("cxx_flags", "unknown"),
    }
