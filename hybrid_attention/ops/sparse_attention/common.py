"""What the torch reference and the Triton kernels of sparse attention share: the FP8 KV storage
format and the addressing of KV rows (contiguous per sequence or paged)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...quant import dequantize_fp8, quantize_fp8

FP8_BLOCK = 64  # one power-of-two scale per 64 FP8 values (SPEC 12)


@dataclass(frozen=True)
class FP8KV:
    """KV rows in the engine's storage format (SPEC 12): the first `d - rope_dim` dims as FP8 e4m3
    with one power-of-two exponent per 64 values, the last `rope_dim` dims as they are (bf16).

    values [.., n, d_nope] float8_e4m3fn, exponents [.., n, d_nope / 64] int8, rope [.., n, d_rope]
    or None (every dim in FP8). The two leading dims are [b, n] for rows per sequence, or
    [pages, page_size] for a paged pool. Reading a row gives exactly the fake-quantised row
    (`fake_quant_nope_fp8`). The three tensors may be strided views of one byte buffer (584 bytes per
    512-dim row): only their last dim must be contiguous.
    """

    values: torch.Tensor
    exponents: torch.Tensor
    rope: torch.Tensor | None = None

    @classmethod
    def quantize(cls, rows: torch.Tensor, rope_dim: int = 0) -> FP8KV:
        """rows [.., n, d] -> FP8 storage of the first d - rope_dim dims, the rest kept."""
        nope = rows.size(-1) - rope_dim
        values, exponents = quantize_fp8(rows[..., :nope], FP8_BLOCK)
        return cls(values, exponents, rows[..., nope:].contiguous() if rope_dim else None)

    @property
    def head_dim(self) -> int:
        return self.values.size(-1) + (self.rope.size(-1) if self.rope is not None else 0)

    @property
    def rows_shape(self) -> tuple[int, int]:
        """(sequences or pages, rows in each)."""
        return (self.values.size(0), self.values.size(1))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[.., n, d] in dtype; exact (the FP8 values times powers of two fit bf16 and fp32)."""
        nope = dequantize_fp8(self.values, self.exponents, dtype)
        if self.rope is None:
            return nope
        return torch.cat((nope, self.rope.to(dtype)), dim=-1)

    def select_rows(self, flat_rows: torch.Tensor) -> FP8KV:
        """The rows at flat positions (over the two leading dims) `flat_rows` [m] -> FP8KV [m, ..]."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1, t.size(-1)).index_select(0, flat_rows)
        return FP8KV(pick(self.values), pick(self.exponents),
                     pick(self.rope) if self.rope is not None else None)


def flat_row_ids(indices: torch.Tensor, rows: int, block_table: torch.Tensor | None) -> torch.Tensor:
    """indices [b, q, k] (>= 0) -> positions [b, q, k] int64 in the KV storage flattened over its
    two leading dims, which hold `rows` rows each: sequence b's row i is b * rows + i, or, paged,
    row i lives in page block_table[b, i // rows] at offset i % rows."""
    indices = indices.long()
    if block_table is None:
        batch = torch.arange(indices.size(0), device=indices.device)[:, None, None]
        return batch * rows + indices
    pages = block_table.long().gather(1, (indices // rows).flatten(1)).view_as(indices)
    return pages * rows + indices % rows
