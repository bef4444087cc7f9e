"""The PFENet/BAM prior mask as PFENet writes it (generalised to non-square features)."""
import torch
import torch.nn.functional as F


def prior_mask_single_shot(query_feat_4, supp_feat_4, mask, resize_size, cosine_eps=1e-7, normalize=True):
    """One shot of PFENet's prior: query (B, C, hq, wq), support (B, C, hs, ws), mask (B, 1, H, W)."""
    mask = F.interpolate(mask, size=(supp_feat_4.size(2), supp_feat_4.size(3)), mode="bilinear", align_corners=True)
    tmp_supp_feat_4 = supp_feat_4 * mask
    q = query_feat_4
    s = tmp_supp_feat_4
    bsize, ch_sz, sp_h, sp_w = q.size()[:]

    tmp_query = q.contiguous().view(bsize, ch_sz, -1)
    tmp_query_norm = torch.norm(tmp_query, 2, 1, True)

    tmp_supp = s.contiguous().view(bsize, ch_sz, -1).contiguous().permute(0, 2, 1)
    tmp_supp_norm = torch.norm(tmp_supp, 2, 2, True)

    similarity = torch.bmm(tmp_supp, tmp_query) / (torch.bmm(tmp_supp_norm, tmp_query_norm) + cosine_eps)
    similarity = similarity.max(1)[0].view(bsize, sp_h * sp_w)
    if normalize:
        similarity = (similarity - similarity.min(1)[0].unsqueeze(1)) / (
            similarity.max(1)[0].unsqueeze(1) - similarity.min(1)[0].unsqueeze(1) + cosine_eps)
    corr_query = similarity.view(bsize, 1, sp_h, sp_w)
    corr_query = F.interpolate(corr_query, size=resize_size, mode="bilinear", align_corners=True)
    return corr_query


def prior_mask(query, support, support_masks, eps=1e-7, normalize=True, reduce="mean", out_size=None):
    """The reference of :func:`fsskern.ops.prior_mask`: PFENet's per-shot loop, then the mean."""
    resize_size = tuple(out_size) if out_size is not None else tuple(query.shape[-2:])
    priors = [prior_mask_single_shot(query, support[:, k], support_masks[:, k:k + 1].to(query.dtype), resize_size,
                                     eps, normalize) for k in range(support.shape[1])]
    prior = torch.cat(priors, 1)
    return prior.mean(1).unsqueeze(1) if reduce == "mean" else prior
