"""Layers built on the fsskern ops."""
from typing import Optional

import torch
from torch import nn

from .ops.attention import prototype_attention


def all_invalid_as_valid(valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, P) key validity with the rows that have no valid key made all valid: UMTFSS masks with -10000 added
    to the scores, which on every key shifts them alike and leaves a plain softmax (the op would give 0)."""
    return valid if valid is None else valid | ~valid.any(1, keepdim=True)


class PrototypeCrossAttention(nn.Module):
    """UMTFSS's prototype cross-attention layer: query tokens attend to prototypes.

    q/k/v/out projections without bias, ``heads`` heads of ``dim // heads`` channels, scale
    head_dim ** -0.5, dropout on the attention weights and after the output projection (both
    only in training). Invalid prototypes are excluded from the softmax (UMTFSS adds -10000); an image whose
    prototypes are all invalid attends to all of them by a plain softmax, as UMTFSS's -10000 on every score gives.

    forward(x (B, N, dim), prototypes (B, P, dim), valid (B, P) bool or None) -> (B, N, dim).
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"PrototypeCrossAttention: dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.out_dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, dim = x.shape
        return x.view(B, N, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, prototypes: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or prototypes.dim() != 3 or x.shape[0] != prototypes.shape[0]:
            raise ValueError(f"PrototypeCrossAttention: expected x (B, N, dim) and prototypes (B, P, dim), got "
                             f"{tuple(x.shape)} and {tuple(prototypes.shape)}")
        if valid is not None and (valid.dtype != torch.bool or valid.shape != prototypes.shape[:2]):
            raise ValueError(f"PrototypeCrossAttention: valid must be a bool (B, P) = {tuple(prototypes.shape[:2])} "
                             f"tensor, got {valid.dtype} of shape {tuple(valid.shape)}")
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(prototypes))
        v = self._split_heads(self.to_v(prototypes))
        out = prototype_attention(q, k, v, key_valid=all_invalid_as_valid(valid),
                                  dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(x.shape)
        return self.out_dropout(self.to_out(out))
