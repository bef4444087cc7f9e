import torch


def build_info() -> dict:
    """What the compiled library contains, e.g. ``{"cuda": True, "cpu_dispatch": [...]}``."""
    raw = torch.ops.fsskern._build_info()
    info = dict(item.split("=", 1) for item in raw.split(";"))
    from .ops.certified_search import bf16_hardware
    hardware = bf16_hardware(torch.device("cpu"))
    # The attention kernels' bf16 products (FSSKERN_BF16_DOT=0 turns them off): fsskern's vdpbf16ps GEMM on
    # AVX512-BF16, oneDNN's brgemm on AMX-BF16's tile units. The search: fsskern's GEMM on AVX512-BF16 without
    # AMX, oneDNN's (bf16 output) on AMX-BF16.
    own = torch.ops.fsskern._bf16_products()
    on_amx = torch.ops.fsskern._bf16_products_on_amx()
    gemm = "fsskern's vdpbf16ps GEMM" if own and hardware == "AVX512-BF16" else "oneDNN's GEMM"
    products = "AMX-BF16, oneDNN's brgemm" if on_amx else "AVX512-BF16, fsskern's vdpbf16ps GEMM"
    return {
        "bf16_search": f"bf16 ({hardware}, {gemm})" if hardware else "fp32 (no AMX-BF16 / AVX512-BF16 on this CPU)",
        "bf16_attention": f"bf16 products ({products})" if own else "float32 (bf16 inputs widened)",
        "cuda": info["cuda"] == "1",
        "cpu_dispatch": info["cpu_dispatch"].split(","),
        "compiler": info["compiler"],
        "cxx_flags": info.get("cxx_flags", "unknown"),
    }
