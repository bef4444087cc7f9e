"""Train a few-shot segmentation model: python python/train.py CONFIG [key=value ...]

Examples:
    python python/train.py configs/dpcl/msrc_v2_mobilenet_v2.yaml out=runs/dpcl data.fold=0
    python python/train.py configs/dpcl/msrc_v2_mobilenet_v2.yaml out=runs/dpcl resume=true   # after a kill
    torchrun --nproc_per_node=2 python/train.py CONFIG out=runs/x                            # DDP
"""
import sys

from fsskern.engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
