"""Streaming state of one attention layer: plain tensors behind a small interface.

What a layer must remember between chunks (SPEC.md section 9, without its fixed-size buffers):
the window ring (the last `window_size` KV rows; token p in slot p % window_size), each
compressor's unfinished block, the compressed KV entries and (CSA) the indexer keys; a "full"
layer keeps every KV row instead of a ring. A later paged cache replaces these tensors with views
onto its pools; the layer only calls the methods below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compressor import CompressorState


class GrowingRows:
    """Rows appended along axis 1 of a [b, n, d] tensor, with amortised doubling of the capacity."""

    def __init__(self, batch_size: int, width: int, dtype: torch.dtype, device=None) -> None:
        self._data = torch.empty(batch_size, 0, width, dtype=dtype, device=device)
        self.length = 0

    def view(self) -> torch.Tensor:
        return self._data[:, : self.length]

    def with_appended(self, rows: torch.Tensor) -> torch.Tensor:
        """All rows so far plus `rows`, without committing them (`length` is unchanged).

        Rows without autograd history are staged in the spare capacity, so a decode step does not
        copy the whole history; rows that carry gradients are concatenated instead."""
        if self.length == 0:
            return rows.to(self._data.dtype)
        if rows.requires_grad:
            return torch.cat((self.view(), rows.to(self._data.dtype)), dim=1)
        end = self.length + rows.size(1)
        self._reserve(end)
        self._data[:, self.length:end] = rows
        return self._data[:, :end]

    def append(self, rows: torch.Tensor) -> None:
        if not isinstance(rows, torch.Tensor) or rows.dim() != 3 \
                or (rows.size(0), rows.size(2)) != (self._data.size(0), self._data.size(2)):
            shown = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"rows must be [{self._data.size(0)}, n, {self._data.size(2)}], got {shown}")
        end = self.length + rows.size(1)
        self._reserve(end)
        self._data[:, self.length:end] = rows.detach()
        self.length = end

    def _reserve(self, needed: int) -> None:
        if needed > self._data.size(1):
            grown = self._data.new_empty(self._data.size(0), max(needed, 2 * self._data.size(1)),
                                         self._data.size(2))
            grown[:, : self.length] = self.view()
            self._data = grown

    def nbytes(self) -> int:
        return self.view().nbytes

    def allocated_nbytes(self) -> int:
        return self._data.nbytes


class StreamingState:
    """What a layer reads and writes between chunks. Implementations: `LayerState` (plain tensors)
    and `cache.PagedLayerState` (views onto a paged cache).

    Attributes: layer_id, kind, fingerprint, batch_size, dtype, pos; window / compressor /
    index_compressor; compressed, index_keys, kv (objects with length, view(), with_appended(rows),
    append(rows), nbytes()). Methods: window_rows(count), write_window(end_pos, rows), nbytes()."""


@dataclass
class LayerState(StreamingState):
    """Everything one layer remembers about a batch of sequences, all at position `pos`."""

    layer_id: int
    kind: str
    fingerprint: str
    batch_size: int
    dtype: torch.dtype
    pos: int = 0
    window: torch.Tensor | None = None  # [b, window_size, d] ring (not for "full")
    kv: GrowingRows | None = None  # "full" layers: every KV row
    compressor: CompressorState | None = None
    compressed: GrowingRows | None = None  # [b, pos // ratio, d]
    index_compressor: CompressorState | None = None
    index_keys: GrowingRows | None = None  # [b, pos // ratio, index_head_dim]

    @property
    def device(self) -> torch.device | None:
        """Where the state's rows live (None for an empty shell)."""
        if self.window is not None:
            return self.window.device
        return self.kv.view().device if self.kv is not None else None

    def window_rows(self, count: int) -> torch.Tensor:
        """The last `count` (<= window_size, <= pos) KV rows in position order, [b, count, d]."""
        slots = torch.arange(self.pos - count, self.pos, device=self.window.device) % self.window.size(1)
        return self.window[:, slots]

    def write_window(self, end_pos: int, rows: torch.Tensor) -> None:
        """Store rows [b, n, d] (n <= window_size) of the tokens at positions end_pos - n .. end_pos - 1."""
        slots = torch.arange(end_pos - rows.size(1), end_pos, device=self.window.device) % self.window.size(1)
        self.window[:, slots] = rows

    def nbytes(self) -> int:
        """Bytes of the state's contents (rows actually held, not spare capacity)."""
        return sum(self.nbytes_by_type().values())

    def nbytes_by_type(self) -> dict[str, int]:
        parts = {
            "window": self.window.nbytes if self.window is not None else 0,
            "full_kv": self.kv.nbytes() if self.kv is not None else 0,
            "compressed_kv": self.compressed.nbytes() if self.compressed is not None else 0,
            "indexer_keys": self.index_keys.nbytes() if self.index_keys is not None else 0,
            "compressor_tail": sum(c.nbytes() for c in (self.compressor, self.index_compressor)
                                   if c is not None),
        }
        return {name: n for name, n in parts.items() if n}
