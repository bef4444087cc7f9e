"""Pure-PyTorch transcriptions of the public functions fsskern.compat replaces, written from
their behaviour (../shared/notes/reference-conventions.md and the code read at the commits named
in fsskern/compat/*): the same operations in the same order, dense intermediates included, and
no fsskern import, so the compat entries are held to an independent statement of each original.
"""
import torch
import torch.nn.functional as F
from torch import nn


# ---- PFENet / BAM -------------------------------------------------------------------------------

def weighted_gap(supp_feat, mask):
    """PFENet Weighted_GAP: mask already on the feature grid; sums as avg_pool2d * h * w."""
    h, w = supp_feat.shape[-2:]
    masked = supp_feat * mask
    area = F.avg_pool2d(mask, (h, w)) * h * w + 0.0005
    return F.avg_pool2d(masked, (h, w)) * h * w / area


def pfenet_prior(query_feat_4, final_supp_list, mask_list, resize_size, cosine_eps=1e-7, weight_soft=None):
    """The prior loop of PFENet.forward (square maps), BAM's weighted sum when weight_soft is given."""
    priors = []
    for supp, mask in zip(final_supp_list, mask_list):
        side = supp.size(2)
        mask = F.interpolate(mask, size=(side, side), mode="bilinear", align_corners=True)
        s = supp * mask
        bsize, ch, sp, _ = query_feat_4.shape
        q = query_feat_4.reshape(bsize, ch, -1)
        q_norm = torch.norm(q, 2, 1, True)
        s = s.reshape(bsize, ch, -1).permute(0, 2, 1)
        s_norm = torch.norm(s, 2, 2, True)
        sim = torch.bmm(s, q) / (torch.bmm(s_norm, q_norm) + cosine_eps)
        sim = sim.max(1)[0].reshape(bsize, sp * sp)
        lo, hi = sim.min(1)[0].unsqueeze(1), sim.max(1)[0].unsqueeze(1)
        sim = (sim - lo) / (hi - lo + cosine_eps)
        prior = F.interpolate(sim.reshape(bsize, 1, sp, sp), size=resize_size, mode="bilinear", align_corners=True)
        priors.append(prior)
    prior = torch.cat(priors, 1)
    if weight_soft is None:
        return prior.mean(1).unsqueeze(1)
    return (weight_soft * prior).sum(1, True)


# ---- PANet --------------------------------------------------------------------------------------

def get_features(fts, mask):
    """PANet getFeatures at B = 1: features upsampled bilinear (align_corners=False) to the mask."""
    fts = F.interpolate(fts, size=mask.shape[-2:], mode="bilinear")
    return torch.sum(fts * mask[None, ...], dim=(2, 3)) / (mask[None, ...].sum(dim=(2, 3)) + 1e-5)


def get_prototype(fg_fts, bg_fts):
    n_ways, n_shots = len(fg_fts), len(fg_fts[0])
    fg = [sum(way) / n_shots for way in fg_fts]
    bg = sum([sum(way) / n_shots for way in bg_fts]) / n_ways
    return fg, bg


def cal_dist(fts, prototype, scaler=20):
    return F.cosine_similarity(fts, prototype[..., None, None], dim=1) * scaler


def align_loss(qry_fts, pred, supp_fts, fore_mask, back_mask):
    """PANet alignLoss: dense one-hot prediction masks, sums over (queries, pixels)."""
    n_ways, n_shots = len(fore_mask), len(fore_mask[0])
    pred_mask = pred.argmax(dim=1, keepdim=True)
    binary = [pred_mask == i for i in range(1 + n_ways)]
    skip = [i for i in range(n_ways) if binary[i + 1].sum() == 0]
    pred_mask = torch.stack(binary, dim=1).float()
    protos = torch.sum(qry_fts.unsqueeze(1) * pred_mask, dim=(0, 3, 4)) / (pred_mask.sum((0, 3, 4)) + 1e-5)
    loss = 0
    for way in range(n_ways):
        if way in skip:
            continue
        pair = [protos[[0]], protos[[way + 1]]]
        for shot in range(n_shots):
            img_fts = supp_fts[way, [shot]]
            supp_pred = torch.stack([cal_dist(img_fts, p) for p in pair], dim=1)
            supp_pred = F.interpolate(supp_pred, size=fore_mask.shape[-2:], mode="bilinear")
            label = torch.full_like(fore_mask[way, shot], 255).long()
            label[fore_mask[way, shot] == 1] = 1
            label[back_mask[way, shot] == 1] = 0
            loss = loss + F.cross_entropy(supp_pred, label[None, ...], ignore_index=255) / n_shots / n_ways
    return loss


# ---- POPNet / EOPNet ----------------------------------------------------------------------------

def mask2map(mask, class_num):
    """(n, h, w) labels -> (n, class_num, h, w): indicator / pixel count (a count of 0 read as 1)."""
    n, h, w = mask.shape
    out = torch.zeros(n, class_num, h, w)
    for i in range(class_num):
        pix = torch.where(mask == i, torch.ones(1), torch.zeros(1))
        count = pix.view(n, h * w).sum(1)
        count = torch.where(count == 0, torch.ones(1), count)
        out[:, i] = pix / count.view(n, 1, 1)
    return out


def popnet_sp_ave_features(sup_features, support_mask, nclasses):
    b, c, h, w = sup_features.shape
    support_mask = F.interpolate(support_mask, size=(h, w), mode="nearest")
    maskmap = mask2map(support_mask.squeeze(1), nclasses)
    return torch.matmul(maskmap.view(b, nclasses, h * w), sup_features.permute(0, 2, 3, 1).reshape(b, h * w, c))


def eopnet_static_prototypes(mask, features, class_num, plobs=True):
    labels = torch.argmax(mask, 1) if plobs else mask
    b, c, h, w = features.shape
    maskmap = mask2map(labels, class_num)
    return torch.matmul(maskmap.view(b, class_num, h * w), features.permute(0, 2, 3, 1).reshape(b, h * w, c))


# ---- UMTFSS -------------------------------------------------------------------------------------

def lsh_codes(x, planes):
    """Hash bits from the projection in float64 (fsskern's hash is exact to that); LSB first."""
    E = x.shape[-1]
    bits = (x.double() @ planes[:, :E].double().T) > planes[:, E].double()
    return [int(sum(1 << i for i in range(bits.shape[1]) if row[i])) for row in bits.tolist()]


def hamming_kmeans(codes, init, iters, bits=32):
    """Plain-Python k-means of integer codes: nearest centroid by popcount (lowest index wins),
    per-bit majority vote (tie keeps the bit), empty cluster keeps its code; iters updates then
    a final assignment. Returns (assign list, counts list)."""
    cent = [codes[i] for i in init]

    def assign_all():
        return [min(range(len(cent)), key=lambda j: (bin(c ^ cent[j]).count("1"), j)) for c in codes]

    for _ in range(iters):
        a = assign_all()
        for j in range(len(cent)):
            members = [c for c, aj in zip(codes, a) if aj == j]
            if not members:
                continue
            new = 0
            for bit in range(bits):
                ones = sum((c >> bit) & 1 for c in members)
                vote = 2 * ones - len(members)
                keep = (cent[j] >> bit) & 1
                new |= (1 if vote > 0 else 0 if vote < 0 else keep) << bit
            cent[j] = new
    a = assign_all()
    return a, [a.count(j) for j in range(len(cent))]


def cluster_group_lsh_kmeans(s_x, supp_valid_mask, supp_mask, planes, inits, clusters=(20, 50), n_iter=10,
                             use_valid=False):
    """UMTFSS SuppSelfAttention.cluster_group_lsh_kmeans with given hash planes (one per part)
    and starting points (inits[part][b]: k token indices into the full sequence of image b)."""
    B, L, C = s_x.shape
    fg = supp_mask.bool()
    out_k, out_mask = [], []
    for b in range(B):
        rows, n_rows = [], 0
        for p, (part, k) in enumerate(zip([fg[b], ~fg[b]], clusters)):
            keep = part if use_valid else part & ~supp_valid_mask[b].bool()
            idx = keep.nonzero().flatten()
            keys = s_x[b][idx]
            if k == 1:
                rows.append(keys.mean(0, keepdim=True))
                n_rows += 1
            elif len(idx) <= k:
                rows.append(keys)
                n_rows += len(idx)
            else:
                codes = lsh_codes(keys, planes[p])
                pos = {int(t): i for i, t in enumerate(idx)}
                assign, counts = hamming_kmeans(codes, [pos[int(t)] for t in inits[p][b]], n_iter)
                one_hot = F.one_hot(torch.tensor(assign), k).to(s_x.dtype)
                counts = torch.tensor(counts, dtype=s_x.dtype).unsqueeze(-1)
                rows.append(one_hot.T @ keys / (counts + 0.001))
                n_rows += k
        total = sum(clusters)
        rows.append(s_x.new_zeros(total - n_rows, C))
        mask = s_x.new_ones(total)
        mask[:n_rows] = 0
        out_k.append(torch.cat(rows, 0))
        out_mask.append(mask)
    return torch.stack(out_k), torch.stack(out_mask)


class ProtoCrossAtt(nn.Module):
    """UMTFSS ProtoCrossAtt as its code computes it (dense scores, additive -10000 mask)."""

    def __init__(self, dim, num_heads=1, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q_fc = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_fc = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_fc = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)
        self.ass_drop = nn.Dropout(0.1)  # unused in UMTFSS's forward, kept for the module tree

    def forward(self, q, k, v, supp_valid_mask=None):
        B, N, C = q.shape
        P, H = k.size(1), self.num_heads
        q = self.q_fc(q).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
        k = self.k_fc(k).reshape(B, P, H, C // H).permute(0, 2, 1, 3)
        v = self.v_fc(v).reshape(B, P, H, C // H).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if supp_valid_mask is not None:
            attn = attn + supp_valid_mask.unsqueeze(1).repeat(1, H, 1).unsqueeze(-2).float() * -10000.0
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
