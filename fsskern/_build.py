import torch


def build_info() -> dict:
    """What the compiled library contains, e.g. ``{"cuda": True, "cpu_dispatch": [...]}``."""
    raw = torch.ops.fsskern._build_info()
    info = dict(item.split("=", 1) for item in raw.split(";"))
    from .ops.certified_search import bf16_hardware
    hardware = bf16_hardware(torch.device("cpu"))
    return {
        "bf16_search": f"bf16 ({hardware})" if hardware else "fp32 (no AMX-BF16 / AVX512-BF16 on this CPU)",
        # how the CPU attention kernels multiply bfloat16 inputs (FSSKERN_BF16_DOT=0 turns the first off)
        "bf16_attention": "bf16 products (AVX512-BF16)" if torch.ops.fsskern._bf16_products()
        else "float32 (bf16 inputs widened)",
        "cuda": info["cuda"] == "1",
        "cpu_dispatch": info["cpu_dispatch"].split(","),
        "compiler": info["compiler"],
        "cxx_flags": info.get("cxx_flags", "unknown"),
    }
