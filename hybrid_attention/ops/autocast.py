"""What the ops' autograd Functions share about mixed precision."""

from __future__ import annotations

import functools

import torch


def without_autocast(method):
    """Run a Function's forward / backward with autocast off: it accumulates in fp32 whatever the
    input dtype (bf16 under `torch.autocast` included) and casts its results back itself."""

    @functools.wraps(method)
    def wrapped(ctx, *args):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return method(ctx, *args)

    return wrapped
