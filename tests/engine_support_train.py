"""``torchrun ... -m engine_support_train CONFIG [key=value ...]``: train with the test model registered."""
import sys

import engine_support  # noqa: F401  (registers tiny_panet)
from fsskern.engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
