"""torchrun / DDP without a second code path: every helper works, and does nothing, when no
process group exists (plain ``python python/train.py``)."""
import os

import torch
import torch.distributed as dist


def init_from_env(device: str) -> None:
    """Join the process group torchrun describes in the environment. Without torchrun's variables (or with
    WORLD_SIZE=1) nothing is initialised.

    On CUDA each rank first binds its own GPU, and the group has a gloo backend beside nccl: nccl reduces CUDA
    tensors only, while the engine also reduces CPU ones (the non-finite-loss flag, the parsing confusion
    matrix), and object collectives then travel over gloo instead of every rank's ``current_device()``, which
    without ``set_device`` is GPU 0 for all of them (nccl refuses two ranks on one GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.startswith("cuda") and ":" in device:
            raise ValueError(f"device={device} names one GPU for all {os.environ['WORLD_SIZE']} processes (nccl "
                             f"refuses two ranks on one GPU): under torchrun pass device=cuda, each rank then binds "
                             f"GPU LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES")
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank())
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; a no-op without a process group."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, POPNet's bank) on every rank; a no-op without a process group. DDP
    broadcasts them only at the next forward, so a validation right after a step would score each rank's own
    statistics, not the weights rank 0 saves as best.pt."""
    if is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a process group."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
