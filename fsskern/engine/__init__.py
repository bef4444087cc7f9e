"""Training and evaluation: a typed config (``config``), the episodic loop (``trainer``), the
evaluator, atomic checkpoints, torchrun/DDP helpers and run logging. Entry points: ``cli``."""
from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config"]
