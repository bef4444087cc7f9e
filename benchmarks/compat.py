"""Model-level benchmark of fsskern.compat: per codebase family, the public-style forward pass at
the paper's size with the original functions (the pure-PyTorch transcriptions in
tests/compat_transcriptions.py) against the compat ones. Time: median of interleaved runs; memory:
peak extra resident memory of the first call at the measured size, each side in a fresh process
(after one call at the quick size, so libraries are loaded but no buffer of the measured size
is cached). On a machine shared with other jobs, run it on one thread: two OpenMP threads on two
busy cores wait on each other (fused ops 25x slower at small sizes), for both sides.

    OMP_NUM_THREADS=1 python benchmarks/compat.py   # paper sizes, about 5 minutes
    python benchmarks/compat.py --quick             # small sizes, 1-3 minutes (mostly process start-up)

Writes benchmarks/results/compat.{md,json} (--quick: compat-quick.{md,json}).

What runs is the part of each forward that the swap touches, from backbone features on (random
features of the paper's shapes; the backbone is the same on both sides and is left out, so the
ratios are those of the method's head, not of the whole network):
- PFENet 1-shot / BAM 5-shot (473 input, ResNet-50 layer2/3/4 at 60x60): down-projections,
  Weighted_GAP per shot, the prior block (BAM: K-shot weights), the merge conv and classifier.
- PANet 1-way 1-shot (417 input, VGG-16 features 512 x 53 x 53), the training forward: getFeatures,
  getPrototype, calDist, upsampling to 417, alignLoss; features require grad, so each side keeps what its
  backward needs (the memory column), but the backward itself is not timed.
- POPNet k-way (512 input, 256 x 128 x 128 decoder features, 17 classes, batch 2): the per-class
  support prototypes and the cosine maps of the NCM head.
- UMTFSS 1-shot (473 input, 256-d tokens at 60x60): the clustered support prototypes
  (LSH + Hamming k-means, 20 fg / 50 bg) and two prototype cross-attention layers (8 heads).
  The original's clustering is a compiled fast-transformers extension that is not installed
  here; its side uses the same algorithm in vectorised PyTorch (fsskern.reference.clustering)
  in UMTFSS's per-image loop.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import compat_transcriptions as T  # noqa: E402
from harness import MEMORY_CHILD_ENV, machine_info, median_times, peak_extra_bytes  # noqa: E402

from fsskern import reference  # noqa: E402
from fsskern.compat import panet, pfenet, popnet, umtfss  # noqa: E402


# ---- PFENet / BAM -------------------------------------------------------------------------------

def pfenet_case(shots, bam, quick):
    side, img = (17, 129) if quick else (60, 473)
    c2, c3, c4, reduce = (64, 128, 256, 32) if quick else (512, 1024, 2048, 256)
    g = torch.Generator().manual_seed(0)
    feats = lambda c: torch.randn(1, c, side, side, generator=g).relu()  # noqa: E731
    inputs = dict(q2=feats(c2), q3=feats(c3), q4=feats(c4), s2=[feats(c2) for _ in range(shots)],
                  s3=[feats(c3) for _ in range(shots)], s4=[feats(c4) for _ in range(shots)],
                  s_y=[torch.randint(0, 2, (1, img, img), generator=g) for _ in range(shots)],
                  weight_soft=torch.randn(1, shots, 1, 1, generator=g).softmax(1) if bam else None)
    torch.manual_seed(0)
    head = nn.ModuleDict(dict(
        down_query=nn.Sequential(nn.Conv2d(c3 + c2, reduce, 1, bias=False), nn.ReLU()),
        down_supp=nn.Sequential(nn.Conv2d(c3 + c2, reduce, 1, bias=False), nn.ReLU()),
        init_merge=nn.Sequential(nn.Conv2d(2 * reduce + 1, reduce, 1, bias=False), nn.ReLU()),
        cls=nn.Conv2d(reduce, 2, 1))).eval()

    def forward(gap, prior):
        x = inputs
        query_feat = head.down_query(torch.cat([x["q3"], x["q2"]], 1))
        masks = [(s_y == 1).float().unsqueeze(1) for s_y in x["s_y"]]  # 255 -> background, as PFENet
        protos = []
        for s2, s3, mask in zip(x["s2"], x["s3"], masks):
            mask = F.interpolate(mask, size=s3.shape[-2:], mode="bilinear", align_corners=True)
            protos.append(gap(head.down_supp(torch.cat([s3, s2], 1)), mask))
        if x["weight_soft"] is None:
            supp = sum(protos) / len(protos)
        else:
            supp = (x["weight_soft"].permute(0, 2, 1, 3) * torch.cat(protos, 2)).sum(2, True)
        corr = prior(x["q4"], x["s4"], masks, (side, side), 1e-7, x["weight_soft"])
        merge = head.init_merge(torch.cat([query_feat, supp.expand_as(query_feat), corr], 1))
        return head.cls(merge)

    return (lambda: forward(T.weighted_gap, T.pfenet_prior),
            lambda: forward(pfenet.Weighted_GAP, pfenet.corr_query_mask))


# ---- PANet --------------------------------------------------------------------------------------

def panet_case(quick):
    side, img, C = (17, 129, 64) if quick else (53, 417, 512)
    g = torch.Generator().manual_seed(0)
    supp = torch.randn(1, 1, C, side, side, generator=g).relu().requires_grad_()
    qry = torch.randn(1, C, side, side, generator=g).relu().requires_grad_()
    fore = torch.zeros(1, 1, img, img)
    fore[..., img // 4:3 * img // 4, img // 4:3 * img // 4] = 1
    back = 1 - fore

    def forward(get_features, get_prototype, cal_dist, align_loss):
        fg = [[get_features(supp[0, 0][None], fore[0, 0][None])]]
        bg = [[get_features(supp[0, 0][None], back[0, 0][None])]]
        fg_protos, bg_proto = get_prototype(fg, bg)
        pred = torch.stack([cal_dist(qry, p) for p in [bg_proto] + fg_protos], dim=1)
        out = F.interpolate(pred, size=(img, img), mode="bilinear")
        return out, align_loss(qry, pred, supp, fore, back)

    return (lambda: forward(T.get_features, T.get_prototype, T.cal_dist, T.align_loss),
            lambda: forward(panet.getFeatures, panet.getPrototype, panet.calDist, panet.alignLoss))


# ---- POPNet -------------------------------------------------------------------------------------

def popnet_case(quick):
    side, img, C, classes, batch = (32, 128, 32, 7, 2) if quick else (128, 512, 256, 17, 2)
    g = torch.Generator().manual_seed(0)
    sup = torch.randn(batch, C, side, side, generator=g)
    qry = torch.randn(batch, C, side, side, generator=g)
    labels = torch.randint(0, classes, (batch, 1, img, img), generator=g).float()

    def forward(pool):
        protos = pool(sup, labels, classes)  # (B, classes, C)
        return torch.stack([F.cosine_similarity(qry, protos[:, i, :, None, None], dim=1)
                            for i in range(1, classes)], 1)

    return lambda: forward(T.popnet_sp_ave_features), lambda: forward(popnet.class_average_features)


# ---- UMTFSS -------------------------------------------------------------------------------------

def umtfss_original_clusters(s_x, pad, fg, clusters=(20, 50), n_iter=10):
    """UMTFSS's per-image, per-part loop with the same algorithm in vectorised PyTorch."""
    B, L, C = s_x.shape
    out_k, out_mask = [], []
    for b in range(B):
        rows, n = [], 0
        for part, k in zip([fg[b] & ~pad[b], ~fg[b] & ~pad[b]], clusters):
            keys = s_x[b][part]
            if len(keys) <= k:
                rows.append(keys)
                n += len(keys)
                continue
            planes = torch.randn(32, C + 1)
            codes = reference.clustering.lsh_hash(keys, planes)[None]
            init = torch.randperm(len(keys))[:k][None]
            valid = torch.ones_like(codes, dtype=torch.bool)
            assign, _, counts = reference.clustering.hamming_kmeans(codes, k, n_iter, valid, init)
            one_hot = F.one_hot(assign[0], k).float()
            rows.append(one_hot.T @ keys / (counts[0].unsqueeze(-1) + 0.001))
            n += k
        rows.append(s_x.new_zeros(sum(clusters) - n, C))
        mask = s_x.new_ones(sum(clusters))
        mask[:n] = 0
        out_k.append(torch.cat(rows))
        out_mask.append(mask)
    return torch.stack(out_k), torch.stack(out_mask)


def umtfss_case(quick):
    side, dim = (20, 64) if quick else (60, 256)
    g = torch.Generator().manual_seed(0)
    s_x = torch.randn(1, side * side, dim, generator=g)
    q = torch.randn(1, side * side, dim, generator=g)
    fg = torch.zeros(1, side, side, dtype=torch.bool)
    fg[:, side // 4:3 * side // 4, side // 4:3 * side // 4] = True
    fg = fg.flatten(1)
    pad = torch.zeros_like(fg)
    torch.manual_seed(0)
    theirs = nn.ModuleList([T.ProtoCrossAtt(dim, 8, attn_drop=0.1, proj_drop=0.1) for _ in range(2)]).eval()
    ours = nn.ModuleList([umtfss.ProtoCrossAtt(dim, 8, attn_drop=0.1, proj_drop=0.1) for _ in range(2)]).eval()
    ours.load_state_dict(theirs.state_dict())

    def forward(cluster, layers):
        k, mask = cluster(s_x, pad, fg)
        k = F.normalize(k, dim=-1)
        x = q
        for layer in layers:
            x = x + layer(x, k, k, mask)
        return x

    return (lambda: forward(umtfss_original_clusters, theirs),
            lambda: forward(lambda s, p, f: umtfss.cluster_group_lsh_kmeans(s, p, f), ours))


CASES = {
    "PFENet 1-shot (473, ResNet-50)": lambda quick: pfenet_case(1, False, quick),
    "BAM 5-shot (473, ResNet-50)": lambda quick: pfenet_case(5, True, quick),
    "PANet 1-way 1-shot, training-mode forward (417, VGG-16)": panet_case,
    "POPNet 17 classes, batch 2 (512)": popnet_case,
    "UMTFSS 1-shot (473, 256-d tokens)": umtfss_case,
}
NO_GRAD = {"PANet 1-way 1-shot, training-mode forward (417, VGG-16)": False}


def run_side(name, side, quick):
    """Peak extra memory of the first call at the measured size, after one call of the same case
    at the quick size (libraries loaded and initialised, no buffer of the measured size cached)."""
    with torch.set_grad_enabled(not NO_GRAD.get(name, True)):
        for size_quick in (True, quick):
            original, compat = CASES[name](size_quick)
            fn = original if side == "original" else compat
            if size_quick and not quick:
                fn()
        return peak_extra_bytes(fn)


def memory(name, side, quick):
    cmd = [sys.executable, __file__, "--memory", name, side] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **MEMORY_CHILD_ENV})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--memory", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(json.dumps({"peak_extra_bytes": run_side(*args.memory, args.quick)}))
        return
    rows = []
    for name, build in CASES.items():
        original, compat = build(args.quick)
        with torch.set_grad_enabled(not NO_GRAD.get(name, True)):
            t_orig, t_ours = median_times([original, compat], args.reps)
        m_orig, m_ours = memory(name, "original", args.quick), memory(name, "compat", args.quick)
        rows.append(dict(case=name, original_ms=t_orig * 1e3, compat_ms=t_ours * 1e3, speedup=t_orig / t_ours,
                         original_mib=m_orig / 2**20, compat_mib=m_ours / 2**20))
        print(f"{name}: {t_orig * 1e3:.1f} -> {t_ours * 1e3:.1f} ms, {m_orig / 2**20:.1f} -> {m_ours / 2**20:.1f} MiB",
              flush=True)
    stem = "compat-quick" if args.quick else "compat"
    info = machine_info()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "quick": args.quick, "reps": args.reps,
                                                   "cases": rows}, indent=2) + "\n")
    title = "# fsskern.compat: public-style forward, original functions vs compat"
    lines = [title + (" (quick sizes)" if args.quick else ""),
             "", f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['torch_threads']} torch threads, "
             f"torch {info['torch']}. Command: `OMP_NUM_THREADS={torch.get_num_threads()} python "
             f"benchmarks/compat.py{' --quick' if args.quick else ''}`; "
             f"median of {args.reps} interleaved runs; peak extra resident memory of the first call, each side in a "
             "fresh process (glibc mmap threshold 64 KiB). Backbone excluded (see the module docstring).", "",
             "| case | original ms | compat ms | speed-up | original MiB | compat MiB "
             "| memory saved (original / compat) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        # a ratio to less than 1 MiB says more about the allocator than about the code
        ratio = f"{r['original_mib'] / r['compat_mib']:.1f}x" if r["compat_mib"] >= 1 else "-"
        lines.append(f"| {r['case']} | {r['original_ms']:.1f} | {r['compat_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['original_mib']:.1f} | {r['compat_mib']:.1f} | {ratio} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
