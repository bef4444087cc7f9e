"""fsskern.metrics against brute-force Python loops; distributed merge with gloo on CPU."""
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fsskern.metrics import (ConfusionMatrix, FewShotMeter, episode_iou_counts, one_way_parsing_summary,
                             seed_statistics)


def _random_episodes(n, classes, size=12, ways=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, ways + 1, (n, size, size), generator=g)
    label[torch.rand(n, size, size, generator=g) < 0.1] = 255
    pred = torch.randint(0, ways + 1, (n, size, size), generator=g)
    cls = torch.tensor(classes)[torch.randint(0, len(classes), (n, ways), generator=g)]
    return pred, label, cls


def _brute_counts(pred, label, c):
    inter = union = 0
    for p, t in zip(pred.flatten().tolist(), label.flatten().tolist()):
        if t == 255:
            continue
        inter += (p == c) and (t == c)
        union += (p == c) or (t == c)
    return inter, union


def test_episode_counts_match_loops_batched():
    pred, label, _ = _random_episodes(4, [1], size=9, ways=2)
    inter, union = episode_iou_counts(pred, label, num_classes=3)
    assert inter.shape == (4, 3) and inter.dtype == torch.int64
    for b in range(4):
        for c in range(3):
            assert (int(inter[b, c]), int(union[b, c])) == _brute_counts(pred[b], label[b], c)


def test_meter_matches_brute_force_miou_fbiou():
    classes = [3, 7, 11, 15]
    pred, label, cls = _random_episodes(40, classes, seed=1)
    inter, union = episode_iou_counts(pred, label)
    meter = FewShotMeter(classes)
    for start in range(0, 40, 8):  # batches of 8
        sl = slice(start, start + 8)
        meter.update(cls[sl, 0], inter[sl], union[sl], torch.arange(40)[sl])
    s = meter.summary()

    per_class, totals = {}, {0: [0, 0], 1: [0, 0]}
    for c in classes:
        i_sum = u_sum = 0
        for e in range(40):
            if int(cls[e, 0]) == c:
                i, u = _brute_counts(pred[e], label[e], 1)
                i_sum, u_sum = i_sum + i, u_sum + u
        per_class[c] = 100 * i_sum / u_sum
    for e in range(40):
        for b in (0, 1):
            i, u = _brute_counts(pred[e], label[e], b)
            totals[b][0] += i
            totals[b][1] += u
    assert s["per_class"] == pytest.approx(per_class)
    assert s["miou"] == pytest.approx(sum(per_class.values()) / 4)
    assert s["fb_iou"] == pytest.approx(50 * (totals[0][0] / totals[0][1] + totals[1][0] / totals[1][1]))
    assert sum(s["coverage"].values()) == 40 and s["episodes"] == 40 and s["unsampled"] == []
    # the episode-averaged variant differs from the class-wise accumulated one
    assert s["episode_miou"] != pytest.approx(s["miou"], abs=1e-6)


def test_unsampled_class_scores_zero_and_warns():
    meter = FewShotMeter([1, 2], min_episodes=3)
    meter.update([1], torch.tensor([[5, 3]]), torch.tensor([[10, 4]]), [0])
    with pytest.warns(UserWarning) as record:
        s = meter.summary()
    messages = " | ".join(str(w.message) for w in record)
    assert "never sampled" in messages and "fewer than 3 episodes: {1: 1}" in messages
    assert s["unsampled"] == [2] and s["per_class"] == {1: 75.0, 2: 0.0} and s["miou"] == 37.5
    assert s["low_coverage"] == [1]


def test_merge_equals_one_meter_and_dedupes_repeats():
    classes = [1, 2, 3]
    pred, label, cls = _random_episodes(30, classes, seed=2)
    inter, union = episode_iou_counts(pred, label)
    whole, a, b = FewShotMeter(classes), FewShotMeter(classes), FewShotMeter(classes)
    whole.update(cls[:, 0], inter, union, torch.arange(30))
    a.update(cls[:17, 0], inter[:17], union[:17], torch.arange(17))
    # b repeats episode 0 as a DistributedSampler pads the last batch
    idx = torch.cat([torch.arange(17, 30), torch.tensor([0])])
    b.update(cls[idx, 0], inter[idx], union[idx], idx)
    a.merge(b.state())
    assert a.summary() == whole.summary()
    assert torch.equal(a.rows, whole.rows)
    bad = FewShotMeter(classes)
    bad.update(cls[:1, 0], inter[:1] + 1, union[:1] + 1, [0])
    with pytest.raises(ValueError, match="recorded twice"):
        a.merge(bad.state())


def test_two_way_rows_and_fbiou_counts_background_once():
    meter = FewShotMeter([4, 9])
    # one 2-way episode: bg (I=8, U=10), way 1 = class 4 (3/6), way 2 = class 9 (1/2)
    meter.update(torch.tensor([[4, 9]]), torch.tensor([[8, 3, 1]]), torch.tensor([[10, 6, 2]]), [5])
    s = meter.summary()
    assert s["per_class"] == {4: 50.0, 9: 50.0}
    assert s["fb_iou"] == pytest.approx(50 * (8 / 10 + 4 / 8))
    assert meter.rows.shape == (2, 7)


def test_seed_statistics_population_std():
    sums = []
    for v in (50.0, 52.0, 57.0):
        sums.append({"miou": v, "fb_iou": v + 20, "episode_miou": v - 1, "per_class": {1: v, 2: v / 2}})
    st = seed_statistics(sums)
    assert st["miou"]["mean"] == pytest.approx(np.mean([50, 52, 57]))
    assert st["miou"]["std"] == pytest.approx(np.std([50, 52, 57]))
    assert st["per_class"][2]["std"] == pytest.approx(np.std([25, 26, 28.5]))
    assert st["seeds"] == 3 and len(st["per_seed"]) == 3


def test_to_json_carries_metadata(tmp_path):
    meter = FewShotMeter([1])
    meter.update([1], torch.tensor([[5, 3]]), torch.tensor([[10, 4]]), [0])
    import json
    doc = json.loads(meter.to_json(tmp_path / "r.json", protocol="pfenet", manifest_sha256="ab12"))
    assert doc["protocol"] == "pfenet" and doc["manifest_sha256"] == "ab12"
    assert doc["summary"]["miou"] == 75.0 and doc["rows"] == [[1, 3, 4, 5, 10, 0, 0]]
    assert json.loads((tmp_path / "r.json").read_text()) == doc


def _dist_worker(rank, world, init_file, pred, label, cls, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        inter, union = episode_iou_counts(pred, label)
        n = pred.shape[0]
        # DistributedSampler-like interleaving, padded with episode 0 to a multiple of the world size
        idx = torch.tensor((list(range(n)) + [0] * (-n % world))[rank::world])
        meter = FewShotMeter([1, 2, 3])
        meter.update(cls[idx, 0], inter[idx], union[idx], idx)
        meter.all_reduce()
        cm = ConfusionMatrix(2)
        cm.update(pred[idx], label[idx])
        cm.all_reduce()
        torch.save({"summary": meter.summary(), "matrix": cm.matrix}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_all_reduce_equals_single_process(tmp_path):
    pred, label, cls = _random_episodes(11, [1, 2, 3], seed=3)
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_dist_worker, args=(2, init_file, pred, label, cls, str(tmp_path)), nprocs=2, join=True)
    inter, union = episode_iou_counts(pred, label)
    single = FewShotMeter([1, 2, 3])
    single.update(cls[:, 0], inter, union, torch.arange(11))
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["summary"] == single.summary()
    # the confusion matrices sum (the padded repeat of episode 0 is counted twice there: sum, not gather)
    cm = ConfusionMatrix(2)
    cm.update(torch.cat([pred, pred[:1]]), torch.cat([label, label[:1]]))
    assert torch.equal(torch.load(tmp_path / "0.pt")["matrix"], cm.matrix)


def test_confusion_matrix_matches_loops_and_popnet_identities():
    n = 12
    g = torch.Generator().manual_seed(4)
    label = torch.randint(0, n, (3, 20, 20), generator=g)
    label[:, :2] = 255
    pred = torch.where(torch.rand(3, 20, 20, generator=g) < 0.6, label.clamp(max=n - 1),
                       torch.randint(0, n, (3, 20, 20), generator=g))
    cm = ConfusionMatrix(n)
    for p, t in zip(pred, label):  # accumulated pair by pair
        cm.update(p, t)
    brute = np.zeros((n, n), np.int64)
    for p, t in zip(pred.flatten().tolist(), label.flatten().tolist()):
        if t != 255:
            brute[t, p] += 1
    assert np.array_equal(cm.matrix.numpy(), brute)
    iou = [brute[c, c] / (brute[c].sum() + brute[:, c].sum() - brute[c, c]) for c in range(n)]
    assert cm.iou() == pytest.approx(iou)
    novel = [3, 7, 10]
    s = cm.parsing_summary(novel)
    assert s["human_miou"] == pytest.approx(100 * np.mean(iou))
    assert s["novel_miou"] == pytest.approx(100 * np.mean([iou[c] for c in novel]))
    # popnet.md section 9 item 7: base = (12 human - 3 novel) / 9
    assert s["base_miou"] == pytest.approx((12 * s["human_miou"] - 3 * s["novel_miou"]) / 9)
    assert s["pixel_accuracy"] == pytest.approx(100 * np.trace(brute) / brute.sum())
    assert s["confusion"] == brute.tolist()


def test_confusion_matrix_absent_class_is_nan_and_skipped():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0, 1], [0, 255]]))
    iou = cm.iou()
    assert np.isnan(iou[2]) and iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(0.5)
    assert cm.miou() == pytest.approx(50.0)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([3]), torch.tensor([1]))


def test_one_way_parsing_summary():
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    a.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))  # bg 1/2, fg 2/3
    b.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1]))  # bg 1/3, fg 1/3
    s = one_way_parsing_summary({5: a, 6: b}, novel=[6])
    bg = (1 / 2 + 1 / 3) / 2
    assert s["human_miou"] == pytest.approx(100 * np.mean([bg, 2 / 3, 1 / 3]))
    assert s["novel_miou"] == pytest.approx(100 / 3)
    # pooled: M = [[2, 1], [2, 3]] -> bg 2/5, fg 3/6
    assert s["bi_iou"] == pytest.approx(100 * (2 / 5 + 3 / 6) / 2)
    # a novel class without a pair (POPNet's pairs can leave one out) used to raise KeyError after the inference
    with pytest.warns(UserWarning, match=r"never evaluated \(scored 0 in the novel mIoU\): \[7\]"):
        assert one_way_parsing_summary({5: a, 6: b}, novel=[6, 7])["novel_miou"] == pytest.approx(100 / 6)
    empty = ConfusionMatrix(2)  # evaluated, neither predicted nor labelled: scored 0, as FewShotMeter does
    empty.update(torch.tensor([0, 0]), torch.tensor([0, 0]))
    assert one_way_parsing_summary({6: b, 7: empty}, novel=[6, 7])["novel_miou"] == pytest.approx(100 / 6)


def test_meter_update_rejects_mismatched_shapes():
    meter = FewShotMeter([1])
    with pytest.raises(ValueError, match="do not match"):
        meter.update([1, 1], torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64), [0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FewShotMeter([]).summary()["miou"] == 0.0
