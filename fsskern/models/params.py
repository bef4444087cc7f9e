"""``model.params`` checking, shared by every model: defaults filled in, unknown keys refused, ranges."""
import math


def parse_params(model: str, given: dict, defaults: dict) -> dict:
    """``defaults`` updated with ``given``; a key not in ``defaults`` is an error naming the valid keys."""
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ValueError(f"{model}: unknown model.params key(s) {', '.join(unknown)}; "
                         f"valid keys: {', '.join(sorted(defaults))}")
    return {**defaults, **(given or {})}


def check_ranges(model: str, p: dict, *, non_negative=(), positive=(), unit=()) -> None:
    """Loss weights and learning-rate multipliers >= 0 (``non_negative``), learning rates, temperatures and scales
    > 0 (``positive``), momenta and rates in [0, 1] (``unit``), each a finite number. PyTorch checks only an
    optimizer's default lr, so a negative group lr or loss weight would train by gradient ascent without a word."""
    rules = [(k, "a number >= 0", lambda v: v >= 0) for k in non_negative] + \
        [(k, "a number > 0", lambda v: v > 0) for k in positive] + \
        [(k, "a number in [0, 1]", lambda v: 0 <= v <= 1) for k in unit]
    for key, what, ok in rules:
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{model}: model.params.{key} must be {what}, got {value!r}")
