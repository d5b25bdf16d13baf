"""Argument checks shared by the ops' api.py files, the layer, the model and the helpers.

Each names the argument and the value it got. A value of the wrong Python type (not a tensor, a
bool or a float where an int belongs) raises TypeError; a value of the right type that is out of
range raises ValueError. (config.py uses the `is_*` tests but raises ValueError for both: a config
field of the wrong type is a bad value read from a file or a command line.)
"""

from __future__ import annotations

import math

import torch

# The dtypes a layer's weights and activations may have (float8 is a storage format, not one
# nn.Linear can hold).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_int(value) -> bool:
    """A Python int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A Python int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_int(name: str, value, minimum: int) -> None:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_positive_finite(name: str, value) -> None:
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (is_finite_number(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_float_dtype(name: str, dtype, allow_none: bool = False) -> None:
    if dtype is None and allow_none:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {dtype!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All the given tensors (None skipped) on one device; the first one named is the reference."""
    given = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = given[0]
    for name, t in given[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def to_device(name: str, device) -> torch.device:
    """torch.device(device), with a message that names the argument when it is not a device."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str | int) or isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device or a device string such as 'cpu', got {device!r}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{name} {device!r} is not a device: {err}") from None
