"""What the torch reference and the Triton kernel of the indexer top-k share: the FP4 key storage."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...quant import dequantize_fp4, quantize_fp4

FP4_BLOCK = 32  # one power-of-two scale per 32 FP4 values (SPEC 12)


@dataclass(frozen=True)
class FP4Keys:
    """Indexer keys in the engine's storage format (SPEC 12): two e2m1 codes per byte, low nibble
    first, packed [b, t, di / 2] uint8, and one power-of-two exponent per 32 values, exponents
    [b, t, di / 32] int8 (68 bytes per 128-dim key). Reading a key gives exactly the fake-quantised
    key (`fake_quant_fp4`)."""

    packed: torch.Tensor
    exponents: torch.Tensor

    @classmethod
    def quantize(cls, keys: torch.Tensor) -> FP4Keys:
        return cls(*quantize_fp4(keys, FP4_BLOCK))

    @property
    def head_dim(self) -> int:
        return 2 * self.packed.size(-1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.packed.size(0), self.packed.size(1), self.head_dim)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """[b, t, di] in dtype, exact (e2m1 values times powers of two fit bf16 and fp32)."""
        return dequantize_fp4(self.packed, self.exponents, dtype)


# The deterministic top-k as one integer sort key (SPEC 12). Larger key = higher score, then lower
# entry id; so a plain top-k over the keys is the top-k with ties to the lower id, and the set
# depends only on the scores. The Triton kernel builds the same keys in registers.
EMPTY_KEY = -(2**63)  # below every packed score: entries a query may not see
_LOW32 = 2**32 - 1


def pack_scores(scores: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """fp32 scores [..., t] and their entry ids [t] -> int64 keys (order-preserving score bits in
    the high word, 2^32 - 1 - id in the low word)."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: they tie
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed-int order = float order
    return (ordered.long() << 32) | (_LOW32 - entries.long())


def unpack_entries(keys: torch.Tensor) -> torch.Tensor:
    """The entry ids of packed keys (int64)."""
    return _LOW32 - (keys & _LOW32)
