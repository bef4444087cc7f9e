import torch


def build_info() -> dict:
    """What the compiled library contains, e.g. ``{"cuda": True, "cpu_dispatch": [...]}``."""
    raw = torch.ops.fsskern._build_info()
    info = dict(item.split("=", 1) for item in raw.split(";"))
    from .ops.certified_search import bf16_hardware
    hardware = bf16_hardware(torch.device("cpu"))
    # fsskern's vdpbf16ps products (FSSKERN_BF16_DOT=0 turns them off): the attention kernels' on AVX512-BF16,
    # the search's there too unless the CPU has AMX-BF16 (oneDNN's GEMM runs on its tile units)
    own = torch.ops.fsskern._bf16_products()
    gemm = "fsskern's vdpbf16ps GEMM" if own and hardware == "AVX512-BF16" else "oneDNN's GEMM"
    return {
        "bf16_search": f"bf16 ({hardware}, {gemm})" if hardware else "fp32 (no AMX-BF16 / AVX512-BF16 on this CPU)",
        "bf16_attention": "bf16 products (AVX512-BF16)" if own else "float32 (bf16 inputs widened)",
        "cuda": info["cuda"] == "1",
        "cpu_dispatch": info["cpu_dispatch"].split(","),
        "compiler": info["compiler"],
        "cxx_flags": info.get("cxx_flags", "unknown"),
    }
