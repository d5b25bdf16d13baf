"""A heterogeneous, paged KV cache: one pool per storage type, each with its own entry format.

DeepSeek-V4's cache is not one shape. Per sequence and layer it holds a sliding-window ring of raw
KV rows, compressed entries (1 per `ratio` tokens), FP4 indexer keys (CSA), every row of a "full"
layer, and each compressor's unfinished block. Each kind lives in its own pool:

    pool             entry                                            grows with the sequence
    window           one KV row (ring of window_size per layer)       no (one ring per layer)
    compressed_kv    one compressed KV entry                          yes, pages of `page_entries`
    indexer_keys     one indexer key                                  yes
    full_kv          one KV row of a "full" layer                     yes
    tail:<shape>     a compressor's pending rows and scores (fp32)    no

With quant="official" entries are stored as real low-precision bytes (SPEC 12): KV rows as FP8
e4m3 for the non-rope dims with a power-of-two exponent per 64 values and the rope dims in the
layer dtype (bf16: 584 bytes for a 512-wide entry); indexer keys as FP4 e2m1, two per byte, with an
exponent per 32 values (68 bytes for 128). The layer already rounded those values to the grids, so
decoding gives back exactly what the fake-quant path computes.

The byte budget is split once: the fixed pools get room for `max_sequences` sequences, the growing
pools share the rest in proportion to the bytes each needs per token. A sequence reserves its
worst case (`max_tokens`) when it is admitted, so running out of pages is refused up front and never
happens half-way through a step.

Rows that a step reads whole (the indexer keys, which every CSA query scores; HCA's compressed
entries, which every HCA query attends) also keep a decoded copy per sequence, extended as entries
are added, so a step decodes only its new entries instead of the whole history (`KEEP_DECODED`).
It is working memory beside the cache (the layer dtype's width per entry: 128 or 256 bytes per
64-wide key, against the cache's 36), not part of the cache's byte budget.
"""

from __future__ import annotations

import math
import numbers

import torch

from .compressor import CompressorState
from .config import ModelConfig
from .quant import dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8
from .state import GrowingRows, StreamingState

ROW_ALIGN = 4  # quantised entries are padded to a multiple of 4 bytes (the planner counts the same)
# Decoded copies of the rows a step reads whole (module docstring). Off: every step decodes every
# stored entry of those rows again (what `bench_engine.py --ab-decoded` compares against).
KEEP_DECODED = True


class CacheFullError(RuntimeError):
    """The cache has too few free pages for a request; nothing was allocated."""


# Codecs: rows [n, width] <-> bytes [n, nbytes] ------------------------------------------------


class PlainCodec:
    def __init__(self, width: int, dtype: torch.dtype) -> None:
        self.width, self.dtype = width, dtype
        self.nbytes = width * torch.empty(0, dtype=dtype).element_size()
        self.name = str(dtype).removeprefix("torch.")

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(self.dtype).contiguous().view(torch.uint8)

    def decode(self, data: torch.Tensor) -> torch.Tensor:
        return _bytes_as(data, self.dtype)


class Fp8KVCodec:
    """FP8 e4m3 non-rope dims + one int8 exponent per 64 + rope dims in `dtype`, padded to ROW_ALIGN."""

    def __init__(self, width: int, rope_dim: int, dtype: torch.dtype) -> None:
        self.width, self.rope_dim, self.dtype = width, rope_dim, dtype
        self.nope = width - rope_dim
        self.rope_bytes = rope_dim * torch.empty(0, dtype=dtype).element_size()
        used = self.nope + self.nope // 64 + self.rope_bytes
        self.padding = -used % ROW_ALIGN  # 583 -> 584 bytes for a V4 entry
        self.nbytes = used + self.padding
        self.name = "fp8-e4m3+" + str(dtype).removeprefix("torch.") + "-rope"

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        values, exponents = quantize_fp8(rows[..., : self.nope], 64)
        rope = rows[..., self.nope:].to(self.dtype).contiguous().view(torch.uint8)
        pad = rope.new_zeros(*rope.shape[:-1], self.padding)
        return torch.cat((values.view(torch.uint8), exponents.view(torch.uint8), rope, pad), dim=-1)

    def decode(self, data: torch.Tensor) -> torch.Tensor:
        n, e = self.nope, self.nope // 64
        values = _bytes_as(data[..., :n], torch.float8_e4m3fn)
        exponents = _bytes_as(data[..., n:n + e], torch.int8)
        rope = _bytes_as(data[..., n + e:n + e + self.rope_bytes], self.dtype)
        return torch.cat((dequantize_fp8(values, exponents, self.dtype), rope), dim=-1)


class Fp4Codec:
    """FP4 e2m1 codes, two per byte (low nibble first), + one int8 exponent per 32 values."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        self.width, self.dtype = width, dtype
        used = width // 2 + width // 32
        self.padding = -used % ROW_ALIGN  # 68 bytes for a 128-wide key, no padding
        self.nbytes = used + self.padding
        self.name = "fp4-e2m1"

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        packed, exponents = quantize_fp4(rows, 32)
        pad = packed.new_zeros(*packed.shape[:-1], self.padding)
        return torch.cat((packed, exponents.view(torch.uint8), pad), dim=-1)

    def decode(self, data: torch.Tensor) -> torch.Tensor:
        half, scales = self.width // 2, self.width // 32
        exponents = _bytes_as(data[..., half:half + scales], torch.int8)
        return dequantize_fp4(data[..., :half].contiguous(), exponents, self.dtype)


def _bytes_as(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the last axis of a uint8 slice as `dtype` (copying when the slice is unaligned)."""
    if not data.is_contiguous() or data.storage_offset() % torch.empty(0, dtype=dtype).element_size():
        data = data.clone()
    return data.view(dtype)


# Pools ----------------------------------------------------------------------------------------


class Pool:
    """Pages of `page_entries` entries of one codec; a free list and a reservation count."""

    def __init__(self, name: str, codec, page_entries: int, n_pages: int, device=None) -> None:
        self.name, self.codec, self.page_entries = name, codec, page_entries
        self.data = torch.zeros(n_pages, page_entries, codec.nbytes, dtype=torch.uint8, device=device)
        self.free = list(range(n_pages - 1, -1, -1))
        self.refs = [0] * n_pages  # holders of each page: sequences sharing a prefix, or a Prefix
        self.reserved = 0

    @property
    def n_pages(self) -> int:
        return self.data.size(0)

    @property
    def page_bytes(self) -> int:
        return self.page_entries * self.codec.nbytes

    def available(self) -> int:
        return len(self.free) - self.reserved

    def take(self, reserved: bool = True) -> int:
        """A free page with one holder; `reserved`: counted against an earlier reservation."""
        if reserved:
            self.reserved -= 1
        page = self.free.pop()
        self.refs[page] = 1
        return page

    def share(self, page: int) -> int:
        self.refs[page] += 1
        return page

    def give_back(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self.free.append(page)

    def read(self, pages: list[int], start: int, stop: int) -> torch.Tensor:
        """Decoded entries [start, stop) of a sequence whose entries fill `pages` in order."""
        if stop <= start:
            return torch.empty(0, self.codec.width, dtype=self.codec.dtype, device=self.data.device)
        first, last = start // self.page_entries, (stop - 1) // self.page_entries
        raw = self.data[torch.tensor(pages[first:last + 1], dtype=torch.long, device=self.data.device)]
        raw = raw.flatten(0, 1)
        offset = first * self.page_entries
        return self.codec.decode(raw[start - offset:stop - offset])

    def read_at(self, pages: list[int], entries: torch.Tensor) -> torch.Tensor:
        """Decoded entries at positions `entries` [n] (int64) of a sequence whose entries fill
        `pages` in order: [n, width]. Decodes those entries only."""
        page_ids = torch.tensor(pages, dtype=torch.long, device=self.data.device)
        slots = page_ids[entries // self.page_entries], entries % self.page_entries
        return self.codec.decode(self.data[slots])

    def write(self, pages: list[int], start: int, rows: torch.Tensor) -> None:
        """Encode rows [n, width] into entries [start, start + n) (pages must already exist)."""
        if rows.size(0) == 0:
            return
        encoded = self.codec.encode(rows)
        index = start + torch.arange(rows.size(0), device=self.data.device)
        page_ids = torch.tensor(pages, dtype=torch.long, device=self.data.device)[index // self.page_entries]
        self.data[page_ids, index % self.page_entries] = encoded


class PagedRows:
    """Rows of one sequence in a growing pool: the interface of `state.GrowingRows`.

    lazy: `with_appended` returns a `PagedRowsView`, which decodes only the rows that are read
    (CSA compressed entries, of which a query attends to the top-k); otherwise the decoded tensor."""

    def __init__(self, pool: Pool, dtype: torch.dtype, lazy: bool = False, decoded: bool = False) -> None:
        self.pool, self.dtype, self.lazy = pool, dtype, lazy
        self.pages: list[int] = []
        self.shared = 0  # leading pages shared with a prefix (full, so never written again)
        self.length = 0
        # decoded: keep the decoded rows too (read whole by every step; module docstring).
        self.decoded = decoded and KEEP_DECODED and not lazy
        self._copy = self._new_copy()

    def _new_copy(self) -> GrowingRows | None:
        if not self.decoded:
            return None
        return GrowingRows(1, self.pool.codec.width, self.dtype, self.pool.data.device)

    def _synced_copy(self) -> GrowingRows:
        """The decoded copy, brought up to `length`: entries added since (appended, or restored from
        a snapshot or a shared prefix) are decoded from the pool, once."""
        copy = self._copy
        if copy.length > self.length:  # cannot happen through this class; rebuilt rather than trusted
            copy = self._copy = self._new_copy()
        if copy.length < self.length:
            copy.append(self.pool.read(self.pages, copy.length, self.length)[None].to(self.dtype))
        return copy

    def view(self) -> torch.Tensor:
        if self.decoded:
            return self._synced_copy().view()
        return self.pool.read(self.pages, 0, self.length)[None].to(self.dtype)  # [1, n, width]

    def with_appended(self, rows: torch.Tensor) -> "torch.Tensor | PagedRowsView":
        """The stored rows plus `rows` [1, m, width] (not stored): [1, length + m, width]."""
        if self.lazy:
            return PagedRowsView(self, rows)
        if self.decoded:  # the new rows staged after the copy (valid until the next call)
            return self._synced_copy().with_appended(rows.to(self.dtype))
        return torch.cat((self.view(), rows.to(self.dtype)), dim=1)

    def append(self, rows: torch.Tensor) -> None:
        end = self.length + rows.size(1)
        while len(self.pages) * self.pool.page_entries < end:
            self.pages.append(self.pool.take())
        self.pool.write(self.pages, self.length, rows[0].detach())
        self.length = end

    def nbytes(self) -> int:
        return self.length * self.pool.codec.nbytes

    def raw(self) -> torch.Tensor:
        """The stored bytes of entries [0, length): [length, nbytes] uint8."""
        pages = torch.tensor(self.pages, dtype=torch.long, device=self.pool.data.device)
        return self.pool.data[pages].flatten(0, 1)[: self.length]

    def write_raw(self, data: torch.Tensor) -> None:
        """Append already-encoded entries [n, nbytes]."""
        end = self.length + data.size(0)
        while len(self.pages) * self.pool.page_entries < end:
            self.pages.append(self.pool.take())
        index = self.length + torch.arange(data.size(0), device=self.pool.data.device)
        pages = torch.tensor(self.pages, dtype=torch.long, device=self.pool.data.device)
        self.pool.data[pages[index // self.pool.page_entries], index % self.pool.page_entries] = data
        self.length = end

    def release(self) -> None:
        for page in self.pages:
            self.pool.give_back(page)
        self.pages, self.shared, self.length = [], 0, 0
        self._copy = self._new_copy()


class PagedRowsView:
    """Rows [1, n, width] of a `PagedRows` followed by rows not stored yet, decoded when read.

    `gather_rows(indices)` decodes only the rows it returns (row i < the stored length: slot
    i % page_entries of page i // page_entries; later rows: the new ones), so a CSA decode step
    reads its top-k entries, not the whole history. `dense()` decodes every row, once (slices share
    it). Both give exactly the values of the dense tensor: the codecs decode each row on its own."""

    def __init__(self, rows: PagedRows, new: torch.Tensor, stop: int | None = None,
                 sliced_from: "PagedRowsView | None" = None) -> None:
        self._rows, self._stored = rows, rows.length
        self._new = new.to(rows.dtype)  # [1, m, width]
        self._stop = rows.length + new.size(1) if stop is None else stop
        self._sliced_from = sliced_from  # None for the view `with_appended` made
        self._all: torch.Tensor | None = None  # the decoded rows, held by that view
        self.dtype = rows.dtype

    @property
    def _root(self) -> "PagedRowsView":
        # Not stored on the root itself: that cycle would keep the decoded rows alive until the
        # garbage collector runs.
        return self._sliced_from if self._sliced_from is not None else self

    @property
    def shape(self) -> torch.Size:
        return torch.Size((1, self._stop, self._rows.pool.codec.width))

    @property
    def device(self) -> torch.device:
        return self._new.device

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, key) -> "PagedRowsView":
        """Only `view[:, :n]`: the first n rows, as a view."""
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)
                and isinstance(key[1], slice) and key[1].start in (None, 0) and key[1].step in (None, 1)):
            raise IndexError(f"a PagedRowsView takes [:, :n] only, got {key!r}")
        stop = len(range(self._stop)[key[1]])
        return PagedRowsView(self._rows, self._new, stop, self._root)

    def dense(self) -> torch.Tensor:
        """Every row, decoded: [1, n, width] (what `PagedRows.with_appended` gives when not lazy)."""
        root = self._root
        if root._all is None:
            stored = self._rows.pool.read(self._rows.pages, 0, self._stored)[None].to(self.dtype)
            root._all = torch.cat((stored, self._new), dim=1)
        return root._all[:, : self._stop]

    def gather_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [1, q, k] (0 <= i < n) -> rows [1, q, k, width], as `indexer.gather_rows` of the
        dense tensor. When there are at least as many indices as rows (a prefill block), it decodes
        every row once instead."""
        if indices.size(0) != 1:
            raise ValueError(f"a PagedRowsView holds one sequence, got indices {tuple(indices.shape)}")
        ids = indices.reshape(-1)
        if self._root._all is not None or ids.numel() >= self._stop:
            rows = self.dense()[0].index_select(0, ids)
        else:
            rows = self._decode(ids)
        return rows.view(*indices.shape, rows.size(-1))

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [n]: stored ones decoded from the pool, the rest taken from the new rows."""
        pool, pages = self._rows.pool, self._rows.pages
        stored = ids < self._stored
        if bool(stored.all()):
            return pool.read_at(pages, ids).to(self.dtype)
        rows = self._new.new_empty(ids.numel(), self._new.size(-1))
        rows[stored] = pool.read_at(pages, ids[stored]).to(self.dtype)
        rows[~stored] = self._new[0].index_select(0, ids[~stored] - self._stored)
        return rows


class PagedLayerState(StreamingState):
    """One sequence's state of one layer, as views onto the cache's pools.

    It offers what `HybridAttention` uses of `state.LayerState` (window_rows, write_window, the
    compressor states, compressed / index_keys / kv rows, pos), so a layer runs on it unchanged."""

    def __init__(self, cache: "PagedKVCache", layer, dtype: torch.dtype) -> None:
        self.layer_id, self.kind = layer.layer_id, layer.kind
        self.fingerprint = layer._fingerprint
        self.batch_size, self.dtype, self.pos = 1, dtype, 0
        self._cache = cache
        self._window_pages: list[int] = []
        self.kv = self.compressed = self.index_keys = None
        self._tails: dict[str, tuple[Pool, int, tuple]] = {}
        if layer.kind == "full":
            self.kv = PagedRows(cache.pools["full_kv"], dtype)
        else:
            self._window_pool = cache.pools["window"]
            self._window_pages = [self._window_pool.take()]
        if layer.compressor is not None:
            # CSA attends to top-k entries per query: read only those (HCA reads them all).
            self.compressed = PagedRows(cache.pools["compressed_kv"], dtype, lazy=layer.kind == "csa",
                                        decoded=layer.kind != "csa")
            self._add_tail("compressor", layer.compressor)
        if layer.indexer is not None:
            self.index_keys = PagedRows(cache.pools["indexer_keys"], dtype, decoded=True)
            self._add_tail("index_compressor", layer.indexer.compressor)

    def _add_tail(self, name: str, compressor) -> None:
        empty = compressor.new_state(1, self._cache.device)
        pool = self._cache.pools[tail_pool_name(compressor)]
        page = pool.take()
        self._tails[name] = (pool, page, tuple(empty.kv.shape))
        self._write_tail(name, empty)

    def _write_tail(self, name: str, state: CompressorState) -> None:
        pool, page, _ = self._tails[name]
        pool.write([page], 0, torch.cat((state.kv.flatten(), state.score.flatten()))[None])

    def _read_tail(self, name: str) -> CompressorState:
        pool, page, shape = self._tails[name]
        flat = pool.read([page], 0, 1)[0]
        half = flat.numel() // 2
        return CompressorState(flat[:half].view(shape).clone(), flat[half:].view(shape).clone())

    compressor = property(lambda self: self._read_tail("compressor"),
                          lambda self, value: self._write_tail("compressor", value))
    index_compressor = property(lambda self: self._read_tail("index_compressor"),
                                lambda self, value: self._write_tail("index_compressor", value))

    @property
    def window(self) -> torch.Tensor:
        ring = self._window_pool.read(self._window_pages, 0, self._window_pool.page_entries)
        return ring[None].to(self.dtype)  # [1, window_size, d]

    def window_rows(self, count: int) -> torch.Tensor:
        size = self._window_pool.page_entries
        slots = torch.arange(self.pos - count, self.pos) % size
        return self.window[:, slots.to(self._cache.device)]

    def write_window(self, end_pos: int, rows: torch.Tensor) -> None:
        size = self._window_pool.page_entries
        slots = torch.arange(end_pos - rows.size(1), end_pos) % size
        data = self._window_pool.codec.encode(rows[0])
        self._window_pool.data[self._window_pages[0], slots.to(self._cache.device)] = data

    def nbytes_by_type(self) -> dict[str, int]:
        """Bytes of what the sequence holds (entries in use, not whole pages), by storage type."""
        parts = {}
        if self._window_pages:
            parts["window"] = min(self.pos, self._window_pool.page_entries) * self._window_pool.codec.nbytes
        for name, rows in (("full_kv", self.kv), ("compressed_kv", self.compressed),
                           ("indexer_keys", self.index_keys)):
            if rows is not None:
                parts[name] = rows.nbytes()
        tails = sum(pool.codec.nbytes for pool, _, _ in self._tails.values())
        if tails:
            parts["compressor_tail"] = tails
        return {k: v for k, v in parts.items() if v}

    def nbytes(self) -> int:
        return sum(self.nbytes_by_type().values())

    def rows(self) -> dict[str, PagedRows]:
        return {name: rows for name, rows in (("kv", self.kv), ("compressed", self.compressed),
                                              ("index_keys", self.index_keys)) if rows is not None}

    def snapshot(self) -> dict[str, torch.Tensor | int]:
        """Every byte this state holds, for context files: {"pos", "window", "rows:*", "tail:*"}."""
        out = {"pos": self.pos}
        if self._window_pages:
            out["window"] = self._window_pool.data[self._window_pages[0]].clone()
        for name, rows in self.rows().items():
            out["rows:" + name] = rows.raw().clone()
        for name, (pool, page, _) in self._tails.items():
            out["tail:" + name] = pool.data[page].clone()
        return out

    def restore(self, snapshot: dict, prefix_pages: dict[str, list[int]] | None = None) -> None:
        """Load a snapshot into this fresh state. The entries on `prefix_pages` (full pages of a
        `Prefix`) are shared, not copied; the snapshot's "rows:*" hold the entries after them."""
        self.pos = snapshot["pos"]
        if "window" in snapshot:
            self._window_pool.data[self._window_pages[0]] = snapshot["window"]
        for name, rows in self.rows().items():
            shared = (prefix_pages or {}).get(name, [])
            rows.pages = [rows.pool.share(page) for page in shared]
            rows.shared = len(shared)
            rows.length = len(shared) * rows.pool.page_entries
            rows.write_raw(snapshot["rows:" + name])
        for name, (pool, page, _) in self._tails.items():
            pool.data[page] = snapshot["tail:" + name]

    def release(self) -> None:
        for page in self._window_pages:
            self._window_pool.give_back(page)
        self._window_pages = []
        for rows in self.rows().values():
            rows.release()
        for pool, page, _ in self._tails.values():
            pool.give_back(page)
        self._tails = {}


def tail_pool_name(compressor) -> str:
    return f"tail:{compressor.n_slots}x{compressor.ape.size(1)}"


class PagedKVCache:
    """Pools for every storage type a model uses, carved from one budget of `cache_bytes`."""

    def __init__(self, model, cache_bytes: int, max_sequences: int = 8, page_entries: int = 64,
                 device=None) -> None:
        cfg: ModelConfig = getattr(model, "cfg", None)
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"model must be a HybridTransformer, got {type(model).__name__}")
        att = cfg.attention
        for name, value in (("cache_bytes", cache_bytes), ("max_sequences", max_sequences),
                            ("page_entries", page_entries)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.layers = [block.attn for block in model.layers]
        self.max_sequences, self.page_entries = max_sequences, page_entries
        real = att.quant == "official"  # torch-port values are not on the grids: store them plainly
        kv_codec = Fp8KVCodec(att.head_dim, att.rope_head_dim, self.dtype) if real else \
            PlainCodec(att.head_dim, self.dtype)
        key_codec = Fp4Codec(att.index_head_dim, self.dtype) if real else \
            PlainCodec(att.index_head_dim, self.dtype)

        fixed: dict[str, tuple] = {}  # name -> (codec, page_entries, pages per sequence)
        growing: dict[str, list] = {}  # name -> [codec, entries per token per sequence]
        for layer in self.layers:
            if layer.kind == "full":
                growing.setdefault("full_kv", [kv_codec, 0.0])[1] += 1.0
            else:
                codec, entries, count = fixed.get("window", (kv_codec, att.window_size, 0))
                fixed["window"] = (codec, entries, count + 1)
            if layer.compressor is not None:
                growing.setdefault("compressed_kv", [kv_codec, 0.0])[1] += 1.0 / layer.ratio
                self._add_tail_pool(fixed, layer.compressor)
            if layer.indexer is not None:
                growing.setdefault("indexer_keys", [key_codec, 0.0])[1] += 1.0 / layer.ratio
                self._add_tail_pool(fixed, layer.indexer.compressor)

        fixed_bytes = sum(c.nbytes * e * n * max_sequences for c, e, n in fixed.values())
        # Each growing pool needs at least one page per sequence to start.
        min_growing = sum(c.nbytes * page_entries * max_sequences for c, _ in growing.values())
        if cache_bytes < fixed_bytes + min_growing:
            raise ValueError(f"cache_bytes={cache_bytes:,} is too small for {max_sequences} sequences: "
                             f"the windows and compressor tails alone need {fixed_bytes:,} bytes, "
                             f"plus {min_growing:,} for one page of each growing pool")
        self.pools: dict[str, Pool] = {}
        for name, (codec, entries, count) in fixed.items():
            self.pools[name] = Pool(name, codec, entries, count * max_sequences, self.device)
        per_token = {name: codec.nbytes * rate for name, (codec, rate) in growing.items()}
        total_rate = sum(per_token.values())
        spare = cache_bytes - fixed_bytes
        for name, (codec, _) in growing.items():
            share = spare * per_token[name] / total_rate
            n_pages = max(max_sequences, int(share // (codec.nbytes * page_entries)))
            self.pools[name] = Pool(name, codec, page_entries, n_pages, self.device)
        self.sequences: dict[int, list[PagedLayerState]] = {}
        self._reserved: dict[int, dict[str, int]] = {}
        self._next_id = 0

    @staticmethod
    def _add_tail_pool(fixed: dict, compressor) -> None:
        name = tail_pool_name(compressor)
        width = 2 * compressor.n_slots * compressor.ape.size(1)
        codec, entries, count = fixed.get(name, (PlainCodec(width, torch.float32), 1, 0))
        fixed[name] = (codec, entries, count + 1)

    # Sizes ----------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes allocated for all pools."""
        return sum(pool.data.nbytes for pool in self.pools.values())

    def pages_needed(self, max_tokens: int) -> dict[str, int]:
        """Pages of each pool that one sequence of up to `max_tokens` tokens can use."""
        need = {name: 0 for name in self.pools}
        for layer in self.layers:
            if layer.kind == "full":
                need["full_kv"] += math.ceil(max_tokens / self.page_entries)
            else:
                need["window"] += 1
            if layer.compressor is not None:
                need["compressed_kv"] += max(1, math.ceil(max_tokens // layer.ratio / self.page_entries))
                need[tail_pool_name(layer.compressor)] += 1
            if layer.indexer is not None:
                need["indexer_keys"] += max(1, math.ceil(max_tokens // layer.ratio / self.page_entries))
                need[tail_pool_name(layer.indexer.compressor)] += 1
        return need

    def can_admit(self, max_tokens: int, prefix: "Prefix | None" = None) -> bool:
        need = self.pages_needed(max_tokens)
        for name, count in (prefix.shared_pages() if prefix is not None else {}).items():
            need[name] -= count
        return all(self.pools[n].available() >= k for n, k in need.items())

    def fits_at_all(self, max_tokens: int) -> bool:
        """Whether a sequence of `max_tokens` could ever fit, with the cache otherwise empty."""
        return all(self.pools[n].n_pages >= k for n, k in self.pages_needed(max_tokens).items())

    def snapshot_layout(self, tokens: int) -> list[dict[str, tuple[int, int]]]:
        """The shape ([rows, bytes per row], uint8) of every part of `PagedLayerState.snapshot`
        for a sequence of `tokens` tokens, per layer; what a context file must hold."""
        layout = []
        for layer in self.layers:
            parts: dict[str, tuple[int, int]] = {}
            if layer.kind == "full":
                parts["rows:kv"] = (tokens, self.pools["full_kv"].codec.nbytes)
            else:
                window = self.pools["window"]
                parts["window"] = (window.page_entries, window.codec.nbytes)
            if layer.compressor is not None:
                parts["rows:compressed"] = (tokens // layer.ratio, self.pools["compressed_kv"].codec.nbytes)
                parts["tail:compressor"] = (1, self.pools[tail_pool_name(layer.compressor)].codec.nbytes)
            if layer.indexer is not None:
                parts["rows:index_keys"] = (tokens // layer.ratio, self.pools["indexer_keys"].codec.nbytes)
                tail = self.pools[tail_pool_name(layer.indexer.compressor)]
                parts["tail:index_compressor"] = (1, tail.codec.nbytes)
            layout.append(parts)
        return layout

    # Sequences ------------------------------------------------------------------------------

    def allocate(self, max_tokens: int, prefix: "Prefix | None" = None) -> int:
        """Reserve room for a sequence of up to `max_tokens` tokens; returns its id. With a
        `prefix`, the sequence starts from it, sharing its full pages.

        Raises CacheFullError (and allocates nothing) when a pool is short of pages."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        need = self.pages_needed(max_tokens)
        if prefix is not None:
            for name, count in prefix.shared_pages().items():
                need[name] -= count
        short = {n: (k, self.pools[n].available()) for n, k in need.items() if self.pools[n].available() < k}
        if short:
            detail = ", ".join(f"{n}: needs {k} pages, {a} free" for n, (k, a) in short.items())
            raise CacheFullError(f"not enough cache for a {max_tokens}-token sequence ({detail})")
        for name, k in need.items():
            self.pools[name].reserved += k
        seq_id, self._next_id = self._next_id, self._next_id + 1
        states = [PagedLayerState(self, layer, self.dtype) for layer in self.layers]
        if prefix is not None:
            for state, snapshot, pages in zip(states, prefix.snapshots, prefix.pages, strict=True):
                state.restore(snapshot, pages)
        self.sequences[seq_id] = states
        self._reserved[seq_id] = need
        return seq_id

    def add_prefix(self, snapshots: list[dict]) -> "Prefix":
        """Store a processed prefix (per-layer snapshots, as `PagedLayerState.snapshot` gives)
        once; sequences allocated with it share its full pages. Release with `drop_prefix`.

        The prefix keeps only what is not on its pages (windows, tails, the rows of the last
        partial page), so the caller can drop the snapshots and hold the payload once."""
        pools = {"kv": "full_kv", "compressed": "compressed_kv", "index_keys": "indexer_keys"}
        need: dict[str, int] = {}
        for snapshot in snapshots:
            for key, data in snapshot.items():
                if key.startswith("rows:"):
                    name = pools[key[5:]]
                    need[name] = need.get(name, 0) + data.size(0) // self.page_entries
        short = {n: k for n, k in need.items() if self.pools[n].available() < k}
        if short:
            raise CacheFullError(f"not enough cache to hold the shared prefix ({short} pages short)")
        pages, rests = [], []
        for snapshot in snapshots:
            layer_pages, rest = {}, dict(snapshot)
            for key, data in snapshot.items():
                if key.startswith("rows:"):
                    pool = self.pools[pools[key[5:]]]
                    full = data.size(0) // pool.page_entries
                    ids = [pool.take(reserved=False) for _ in range(full)]
                    if full:
                        pool.data[torch.tensor(ids, dtype=torch.long)] = \
                            data[: full * pool.page_entries].view(full, pool.page_entries, -1)
                    layer_pages[key[5:]] = ids
                    rest[key] = data[full * pool.page_entries:].clone()
            pages.append(layer_pages)
            rests.append(rest)
        return Prefix(rests, pages, {n: self.pools[n] for n in pools.values() if n in self.pools})

    def drop_prefix(self, prefix: "Prefix") -> None:
        for layer_pages in prefix.pages:
            for name, ids in layer_pages.items():
                pool = prefix.pools[{"kv": "full_kv", "compressed": "compressed_kv",
                                     "index_keys": "indexer_keys"}[name]]
                for page in ids:
                    pool.give_back(page)
        prefix.pages = []

    def _known(self, seq_id: int) -> int:
        if seq_id not in self.sequences:
            raise ValueError(f"no sequence {seq_id!r} in this cache (allocated: {sorted(self.sequences)})")
        return seq_id

    def states(self, seq_id: int) -> list[PagedLayerState]:
        return self.sequences[self._known(seq_id)]

    def free(self, seq_id: int) -> None:
        """Return a sequence's pages and the rest of its reservation."""
        states = self.sequences.pop(self._known(seq_id))
        used = {name: 0 for name in self.pools}
        for state in states:
            for pool_name, pages in _pages_of(state).items():
                used[pool_name] += pages
            state.release()
        for name, k in self._reserved.pop(seq_id).items():
            self.pools[name].reserved -= k - used[name]

    def nbytes_by_type(self, seq_id: int) -> dict[str, int]:
        """Bytes one sequence holds, by storage type, split CSA / HCA like the planner."""
        totals: dict[str, int] = {}
        for state in self.sequences[self._known(seq_id)]:
            for name, n in state.nbytes_by_type().items():
                key = {"compressed_kv": f"{state.kind}_compressed", "indexer_keys": "csa_indexer_keys",
                       "full_kv": "full"}.get(name, name)
                totals[key] = totals.get(key, 0) + n
        return totals


class Prefix:
    """A processed prefix held once in the cache: per layer, a snapshot of the bytes to copy
    (window, tails, the last partial page) and the full pages that sequences share."""

    def __init__(self, snapshots: list[dict], pages: list[dict[str, list[int]]], pools: dict) -> None:
        self.snapshots, self.pages, self.pools = snapshots, pages, pools

    @property
    def tokens(self) -> int:
        return self.snapshots[0]["pos"]

    def shared_pages(self) -> dict[str, int]:
        names = {"kv": "full_kv", "compressed": "compressed_kv", "index_keys": "indexer_keys"}
        counts: dict[str, int] = {}
        for layer_pages in self.pages:
            for name, ids in layer_pages.items():
                counts[names[name]] = counts.get(names[name], 0) + len(ids)
        return counts


def _pages_of(state: PagedLayerState) -> dict[str, int]:
    """Pages a sequence took from its reservation (shared prefix pages not included)."""
    pages: dict[str, int] = {}
    if state._window_pages:
        pages["window"] = len(state._window_pages)
    for name, rows in (("full_kv", state.kv), ("compressed_kv", state.compressed),
                       ("indexer_keys", state.index_keys)):
        if rows is not None:
            pages[name] = pages.get(name, 0) + len(rows.pages) - rows.shared
    for pool, _, _ in state._tails.values():
        pages[pool.name] = pages.get(pool.name, 0) + 1
    return pages
