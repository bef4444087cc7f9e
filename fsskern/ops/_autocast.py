"""Autocast rules of the ops.

Inside ``torch.autocast`` the floating-point tensors an op receives (float32, or float16 / bfloat16 of the other
kind) are cast to the autocast dtype of their device (bfloat16 or float16), as autocast casts the inputs of a
matmul, so inputs of mixed reduced dtypes meet the kernels in one; the kernels read float16/bfloat16
as they are and compute in float32. What comes back is each op's rule: the attention ops return the
autocast dtype (as ``scaled_dot_product_attention``), ``max_cosine`` float32 values (as
``cosine_similarity``), ``lsh_hash`` int64 codes. float64 tensors are left alone, as autocast leaves them.
"""
import torch

_LIB = torch.library.Library("fsskern", "IMPL")


def cast_inputs_under_autocast(name: str, keep=()):
    """Registers the rule for ``fsskern::<name>`` on CPU and CUDA; argument positions in ``keep`` stay float32."""
    op = getattr(torch.ops.fsskern, name).default
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def run(*args, device_type=device_type, key=key):
            dtype = torch.get_autocast_dtype(device_type)
            cast = [a.to(dtype) if i not in keep and isinstance(a, torch.Tensor) and a.is_floating_point()
                    and a.dtype != torch.float64 and a.device.type == device_type else a
                    for i, a in enumerate(args)]
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
                return op(*cast)

        op.py_impl(key)(run)  # the path torch.compile traces
        _LIB.impl(name, lambda _keyset, *args, run=run: run(*args), key_name, with_keyset=True)
