"""UMTFSS's clustering in pure PyTorch: hashing as fast-transformers computes it, k-means on
unpacked bits with +-1 votes (the same algorithm and tie rules as fsskern's kernels), and the
prototype means as UMTFSS writes them."""
import torch
import torch.nn.functional as F


def autocast_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the fused ``lsh_hash`` reads it: inside torch.autocast a float32 x is rounded to the autocast dtype
    (the op's autocast rule), so that both backends hash the same numbers."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def lsh_hash(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """x (..., E), planes (bits, E + 1) -> int64 codes, least-significant bit first."""
    E = x.shape[-1]
    bits = (x @ planes[:, :E].T) > planes[:, E]
    shifts = torch.arange(planes.shape[0], device=x.device)
    return (bits.long() << shifts).sum(-1)  # bits are disjoint: the sum is their bitwise or


def unpack_bits(codes: torch.Tensor) -> torch.Tensor:
    """(...,) int64 -> (..., 64) of 0/1."""
    return (codes.unsqueeze(-1) >> torch.arange(64, device=codes.device)) & 1


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    return (bits.long() << torch.arange(64, device=bits.device)).sum(-1)


def hamming_kmeans(codes, k, iters, valid, init):
    """Per batch item: returns assign (B, N), centroids (B, k), counts (B, k)."""
    B, N = codes.shape
    assign = torch.full((B, N), -1, dtype=torch.long, device=codes.device)
    centroids = torch.zeros(B, k, dtype=torch.long, device=codes.device)
    counts = torch.zeros(B, k, dtype=torch.long, device=codes.device)
    for b in range(B):
        points = valid[b].nonzero().flatten()
        if len(points) <= k:
            assign[b, points] = torch.arange(len(points), device=codes.device)
            centroids[b, :len(points)] = codes[b, points]
            counts[b, :len(points)] = 1
            continue
        x = unpack_bits(codes[b, points])  # (n, 64)
        cent = unpack_bits(codes[b, init[b]])  # (k, 64)

        def nearest():
            dist = (x[:, None, :] != cent[None, :, :]).sum(-1)  # (n, k)
            return dist.argmin(1)  # first minimum: lowest index on ties

        for _ in range(iters):
            a = nearest()
            # float64 counts stay exact integers (n < 2^53), and CUDA has no int64 matmul
            one_hot = F.one_hot(a, k).T.double()  # (k, n)
            votes = one_hot @ (2 * x - 1).double()  # (k, 64): +1 per set bit, -1 per unset bit
            members = one_hot.sum(1, keepdim=True)
            new = torch.where(votes > 0, 1, torch.where(votes < 0, 0, cent))
            cent = torch.where(members > 0, new, cent)
        a = nearest()
        assign[b, points] = a
        centroids[b] = pack_bits(cent)
        counts[b] = torch.bincount(a, minlength=k)
    return assign, centroids, counts


def cluster_means(features, assign, k, eps=1e-3):
    """UMTFSS: one_hot(assign)^T @ feats / (counts + 0.001); assign -1 belongs to no cluster."""
    one_hot = F.one_hot(assign.clamp(min=-1) + 1, k + 1)[..., 1:]  # (B, N, k)
    counts = one_hot.sum(1)  # int64, and divided in float32 at least: bf16 rounds counts above 256 (299 -> 300)
    denominator = counts.to(torch.promote_types(features.dtype, torch.float32)) + eps
    sums = one_hot.to(features.dtype).transpose(1, 2) @ features
    return (sums / denominator.unsqueeze(-1)).to(features.dtype), counts
