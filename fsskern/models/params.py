"""``model.params`` checking, shared by every model: defaults filled in, unknown keys refused."""


def parse_params(model: str, given: dict, defaults: dict) -> dict:
    """``defaults`` updated with ``given``; a key not in ``defaults`` is an error naming the valid keys."""
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ValueError(f"{model}: unknown model.params key(s) {', '.join(unknown)}; "
                         f"valid keys: {', '.join(sorted(defaults))}")
    return {**defaults, **(given or {})}
