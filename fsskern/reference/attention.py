"""The two attentions as the FSS code writes them: the full score matrix, an additive or
multiplicative mask, softmax, dropout, then the weighted sum."""
from typing import Optional

import torch
import torch.nn.functional as F


def prototype_attention(q, k, v, key_valid=None, scale=None, dropout_p=0.0, dropout_keep=None):
    """UMTFSS's prototype cross-attention core (einsum, -10000 on invalid prototypes).

    q (B, H, N, D), k / v (B, H, P, D). ``dropout_keep`` (B, H, N, P) bool replaces the random
    dropout mask (tests pass the mask fsskern drew); otherwise ``F.dropout`` with ``dropout_p``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dots = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if key_valid is not None:
        dots = dots + (~key_valid)[:, None, None, :].to(dots.dtype) * -10000.0
    attn = dots.softmax(dim=-1)
    if dropout_keep is not None:
        attn = attn * dropout_keep / (1 - dropout_p)
    elif dropout_p > 0:
        attn = F.dropout(attn, dropout_p)
    return torch.einsum("bhij,bhjd->bhid", attn, v)


def local_conditional_attention(query, support, support_mask, value: Optional[torch.Tensor] = None,
                                mode: str = "exclude"):
    """CRCNet's local conditional module on features (B, C, N): M = query^T support, masked,
    softmax over support pixels, out = value M^T. ``exclude`` masks with -inf (rows without
    foreground give 0), ``multiply`` multiplies the logits by the mask as the paper writes."""
    value = support if value is None else value
    logits = torch.bmm(query.transpose(1, 2), support)  # (B, Nq, Ns)
    mask = support_mask.to(logits.dtype).unsqueeze(1)
    if mode == "multiply":
        attn = (logits * mask).softmax(dim=-1)
    else:
        attn = logits.masked_fill(mask == 0, float("-inf")).softmax(dim=-1)
        attn = attn.masked_fill(mask.sum(-1, keepdim=True) == 0, 0.0)
    return torch.bmm(value, attn.transpose(1, 2))
