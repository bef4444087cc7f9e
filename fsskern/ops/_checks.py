"""Argument checks shared by the op wrappers (tensor checks live in C++, next to the kernels)."""


def check_choice(op: str, name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {sorted(choices, key=repr)}, got {value!r}")
