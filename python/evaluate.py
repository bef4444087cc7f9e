"""Evaluate a run folder or a (training-free) config: python python/evaluate.py (RUN_DIR | CONFIG) [key=value ...]

Examples:
    python python/evaluate.py configs/baseline/msrc_v2_mobilenet_v2.yaml out=runs/baseline eval.seeds=[0,1,2]
    python python/evaluate.py runs/dpcl eval.episodes=1000 eval.seeds=[0,1,2]
Writes OUT/metrics.json (miou, fb_iou, miou_std, per_class, per_seed, episodes, protocol, manifest_sha256, config).
"""
import sys

from fsskern.engine.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
