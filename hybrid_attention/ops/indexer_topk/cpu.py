"""The CPU backend of the indexer top-k: the reference's tiles, with the scores' GEMM in int8 where
that gives the same numbers bit for bit.

Why it is exact. With quant="official" the indexer's queries and keys are FP4 e2m1 values times a
power of two per 32 values (SPEC 12). Scaled by one power of two per row, such a row is a row of
small integers: `row = ints * 2^u` with |ints| <= 127 whenever its blocks' scales lie within 2^3 of
each other (the e2m1 values are multiples of 0.5 up to 6). Then q . k = (ints_q . ints_k) *
2^(u_q + u_k), and the integer dot product is exact in int32. The fp32 GEMM of the reference
computes the same value exactly too: every partial sum is a multiple of 2^(u_q + u_k) below 2^24
of them (d * 127^2 < 2^24 for d <= 1040), so no addition rounds, in whatever order the GEMM adds.
The two paths therefore produce equal per-head products; the ReLU, the weighting and the head sum
that follow are the reference's own operations on equal values, so the scores and the picks are
bit-identical.

When it applies (checked on every call, nothing assumed): fp32 queries, every query row and every
key row representable as above (`int8_rows`), d <= 1024, scales in fp32's normal range, and the
weights times 2^u_q exact, and at least MIN_QUERY_ROWS query rows (a decode step's few rows do not
pay for converting the keys). Anything else (bf16 models, quant="none", a row with an outlying block)
runs the reference's own GEMM and tiles (with the fused epilogue below, on prefill-sized calls), so
the result never depends on which path ran. The int8 GEMM is
`torch._int_mm` (oneDNN's int8 kernels); it is used where the CPU has int8 dot-product
instructions (`int8_gemm_is_fast`, read from /proc/cpuinfo at import; `USE_INT8`).

The tile's epilogue. After the GEMM, the ReLU, the int32 -> fp32 conversion, the weighting and the
head sum are four passes over the [tile, heads, keys] products in eager torch, 70% of a tile's
time (1.16 of 1.65 ms for 128 queries x 8 heads x 1024 keys, one thread). `head_sum_int8` and
`head_sum_fp32` write them as one expression that `torch.compile` turns into one loop (0.36 ms
for twice that tile): the same operations on the same values, each product rounded once and the
heads added in order in fp32 (`reference.head_sum`), so the scores are bit-identical to the eager
ones (the tests cover 1-13 heads; 64 was checked by hand). The heads are unrolled in the
compiled loop, so its compile time grows with them (3 s for 8 heads, 22 s for 64); past
FUSED_HEADS the eager passes run. The fp32 and bf16 routes (quant="none" models; bf16 models)
get the same fused epilogue after their GEMM (`head_sum_fp32`, `head_sum_bf16`, which rounds
each weighted product and the total to bf16 where the eager bf16 ops do). Where compiling is not
possible (no C++ compiler) the eager passes run, after one warning (`FUSE_EPILOGUE`).
"""

from __future__ import annotations

import math
import warnings

import torch

from .common import FP4Keys
from .reference import (
    block_scores,
    head_products,
    head_sum,
    indexer_topk_reference,
    tile_products,
    tiled_topk,
)


def int8_gemm_is_fast() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), with
    which oneDNN's int8 GEMM beats fp32; elsewhere int8 is still exact but not worth the checks."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


# Read once at import; benchmarks and tests set it to compare the two routes in one process.
USE_INT8 = int8_gemm_is_fast()
# Converting the keys to int8 rows costs a few passes over them per call; the GEMM saves time per
# query row. Below this many query rows (b * s * heads: a decode step has 8) the conversion is not
# paid back, and the fp32 route runs.
MIN_QUERY_ROWS = 512
MAX_DIM = 1024  # d * 127^2 < 2^24: the int32 dot products convert to fp32 exactly
_MIN_EXPONENT = -126  # scales stay normal fp32 numbers
_MAX_EXPONENT = 100  # and |dots| * 2^(u_q + u_k) < 2^24 * 2^100, far below fp32's 2^128


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x [..., d] fp32 -> (ints int8 [..., d], u int32 [...]) with x = ints * 2^u exactly, or None
    when some row is not such a row. u puts each row's largest magnitude just below 2^7."""
    _, e = torch.frexp(x.abs().amax(dim=-1))  # amax < 2^e (e = 0 for a zero row)
    u = e - 7
    scaled = x * _pow2(-u)[..., None]  # exact: a power of two (u is checked by the caller)
    ints = scaled.to(torch.int8)  # |scaled| < 128; truncates what is not an integer...
    if not torch.equal(ints.to(torch.float32), scaled):  # ...which this catches, as it does inf / nan
        return None
    return ints, u


def _pow2(u: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(u, dtype=torch.float32), u.float())


def int8_operands(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor):
    """(q ints [b, s, hi, d], weights * 2^u_q [b, s, hi], key ints [b, t, d], 2^u_k [b, t]) when the
    int8 scores equal the fp32 ones bit for bit, else None (see the module docstring)."""
    if q.dtype != torch.float32 or keys.dtype != torch.float32 or q.size(-1) > MAX_DIM or keys.size(1) == 0:
        return None
    probe = q.reshape(-1, q.size(-1))[:16]  # a few rows first: quant="none" queries fail at once
    if int8_rows(probe) is None:
        return None
    rows_q, rows_k = int8_rows(q), int8_rows(keys)
    if rows_q is None or rows_k is None:
        return None
    (q_ints, u_q), (k_ints, u_k) = rows_q, rows_k
    if int(u_q.min()) + int(u_k.min()) < _MIN_EXPONENT or int(u_k.min()) < _MIN_EXPONENT:
        return None
    if int(u_q.max()) + int(u_k.max()) > _MAX_EXPONENT:  # a dot product could overflow fp32
        return None
    scaled_weights = weights * _pow2(u_q)
    if not torch.equal(scaled_weights * _pow2(-u_q), weights):  # 2^u_q w lost bits (or overflowed)
        return None
    # Every product and partial sum, with or without the factor 2^u_k, stays a normal fp32 number
    # (or an exact one): its smallest nonzero size is that of the smallest weight's ulp.
    magnitude = scaled_weights.abs()
    smallest = magnitude[magnitude > 0].min() if bool((magnitude > 0).any()) else None
    if smallest is not None:
        low = math.log2(float(smallest)) - 24 + min(int(u_k.min()), 0)
        high = math.log2(float(magnitude.max())) + math.log2(127 * 127 * q.size(-1) * q.size(2)) \
            + max(int(u_k.max()), 0)
        if low < _MIN_EXPONENT or high > _MAX_EXPONENT:
            return None
    return q_ints, scaled_weights, k_ints, _pow2(u_k)


# The fused epilogue (module docstring): on for calls of at least MIN_QUERY_ROWS query rows and tiles
# of at least FUSED_PRODUCTS per-head products (a decode step's few rows do not pay for the
# compiled call's guards, nor for a compilation of their own shapes) and at most
# FUSED_HEADS heads (the compile time grows with them).
FUSE_EPILOGUE = True
FUSED_PRODUCTS = 1 << 15
FUSED_HEADS = 32
# Products per GEMM with the fused epilogue: twice the eager passes' SCORE_TILE (an 8 MB int32 tile;
# the compiled call's fixed cost is paid half as often). 128 queries x 131072 keys, 2 threads:
# 1.50 s against 1.84 s at SCORE_TILE, and 1.44 s at four times it.
FUSED_SCORE_TILE = 1 << 21
_compiled: dict[str, object] = {}


def head_sum_int8(dots: torch.Tensor, weights: torch.Tensor, key_scale: torch.Tensor,
                  out: torch.Tensor) -> None:
    """dots int32 [n, hi, t], weights [n, hi] (times 2^u_q), key_scale [t] -> out fp32 [n, t]:
    relu(dots_h) * w_h added over h in order, times the key's scale (`int8_block_scores`' eager
    passes, fused)."""
    total = dots[:, 0].clamp_min(0).to(torch.float32) * weights[:, 0, None]
    for h in range(1, dots.size(1)):
        total = total + dots[:, h].clamp_min(0).to(torch.float32) * weights[:, h, None]
    out.copy_(total * key_scale)


def head_sum_fp32(products: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """products fp32 [n, hi, t], weights [n, hi] -> out [n, t]: relu(products_h) * w_h added over h
    in order (`reference.block_scores` after its GEMM, fused)."""
    total = products[:, 0].clamp_min(0) * weights[:, 0, None]
    for h in range(1, products.size(1)):
        total = total + products[:, h].clamp_min(0) * weights[:, h, None]
    out.copy_(total)


def head_sum_bf16(products: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """products bf16 [n, hi, t], weights bf16 [n, hi] -> out fp32 [n, t]: relu(products_h) * w_h
    rounded to bf16 (as a bf16 multiply rounds), added over h in order in fp32, the total rounded
    to bf16 once (`reference.block_scores` of bf16 inputs after its GEMM, fused). The explicit
    casts are the eager roundings; the compile keeps them (`emulate_precision_casts`)."""
    def term(h: int) -> torch.Tensor:
        value = products[:, h].float().clamp_min(0) * weights[:, h, None].float()
        return value.to(torch.bfloat16).float()

    total = term(0)
    for h in range(1, products.size(1)):
        total = total + term(h)
    out.copy_(total.to(torch.bfloat16).float())


def fused(function, heads: int, products: int):
    """The compiled `function`, or None where the eager passes run: fusing off, too few products
    or too many heads, inside another compilation, or compiling failed once in this process."""
    if not FUSE_EPILOGUE or heads > FUSED_HEADS or products < FUSED_PRODUCTS \
            or torch.compiler.is_compiling():
        return None
    name = function.__name__
    if name not in _compiled:
        # Not fullgraph: past dynamo's recompile limit (a process that meets many head counts) the
        # function's own body runs eagerly, the same additions in the same order.
        # emulate_precision_casts: an explicit cast to bf16 rounds, as in eager (else the compiled
        # loop may keep the fp32 value).
        _compiled[name] = torch.compile(function, dynamic=True, options={"emulate_precision_casts": True})
    return _compiled[name]


def run_fused(compiled, *args) -> bool:
    """Call a compiled epilogue; False (after one warning) when it cannot be built here."""
    if compiled is None:
        return False
    try:
        compiled(*args)
    except Exception as error:  # noqa: BLE001 -- any failure to compile: the eager passes are exact
        global FUSE_EPILOGUE
        FUSE_EPILOGUE = False
        warnings.warn(f"the indexer's fused epilogue could not be compiled ({type(error).__name__}: "
                      f"{error}); using eager torch ops, which give the same picks more slowly",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def int8_block_scores(q_ints: torch.Tensor, weights: torch.Tensor, k_ints: torch.Tensor,
                      k_scale: torch.Tensor, ints: torch.Tensor, products: torch.Tensor,
                      out: torch.Tensor) -> None:
    """The scores of one tile (`reference.block_scores` on the values these ints stand for):
    q_ints [b, n, hi, d], weights [b, n, hi] (times 2^u_q), k_ints [b, t, d], k_scale [b, t];
    `ints` (int32) and `products` (fp32) are flat workspaces of b*n*hi*t elements or more; writes
    fp32 [b, n, t] into `out`.

    The key's scale 2^u_k is common to every head of a score, and multiplying by a power of two
    commutes with fp32 rounding (away from overflow and subnormals, which `int8_operands` rules
    out), so it is applied once to the head sum: round(v_h w_h) summed over h, times 2^u_k, is the
    reference's sum of round(v_h 2^u_k w_h), bit for bit."""
    b, n, hi, d = q_ints.shape
    t = k_ints.size(1)
    compiled = fused(head_sum_int8, hi, n * hi * t)
    for i in range(b):
        dots = torch._int_mm(q_ints[i].reshape(n * hi, d), k_ints[i].t(),
                             out=ints[: n * hi * t].view(n * hi, t))  # [n * hi, t] int32
        if run_fused(compiled, dots.view(n, hi, t), weights[i], k_scale[i], out[i]):
            continue
        dots.clamp_min_(0)  # the ReLU, on the integers (the scales are positive)
        # int32 -> fp32 is exact (|dots| < 2^24); times the weight (x 2^u_q): one rounding each.
        # (A copy then an fp32 multiply: a third faster here than one mixed-dtype multiply.)
        per_head = products[: n * hi * t].view(1, n, hi, t)
        per_head.view(n * hi, t).copy_(dots)
        per_head.mul_(weights[i, :, :, None])
        head_sum(per_head, out[i:i + 1]).mul_(k_scale[i])


def indexer_topk_cpu(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor | FP4Keys, k: int,
                     visible: torch.Tensor, query_block: int | None = None) -> torch.Tensor:
    """`indexer_topk_reference`, scoring with int8 GEMMs when they are exact (else the reference)."""
    if isinstance(keys, FP4Keys):
        keys = keys.dequantize(q.dtype)
    b, s = q.shape[:2]
    use = USE_INT8 and k and s and b * s * q.size(2) >= MIN_QUERY_ROWS
    operands = int8_operands(q, weights, keys) if use else None
    if operands is None:
        if q.dtype in _HEAD_SUMS and FUSE_EPILOGUE and b * s * q.size(2) >= MIN_QUERY_ROWS:
            return _fused_topk(q, weights, keys, k, visible, query_block)
        return indexer_topk_reference(q, weights, keys, k, visible, query_block)
    q_ints, scaled_weights, k_ints, k_scale = operands
    score_tile = _score_tile(q.size(2))
    size = tile_products(b, s, q.size(2), keys.size(1), query_block, score_tile)
    ints, products = torch.empty(size, dtype=torch.int32), torch.empty(size)

    def score(rows: slice, cols: slice, out: torch.Tensor) -> None:
        int8_block_scores(q_ints[:, rows], scaled_weights[:, rows], k_ints[:, cols], k_scale[:, cols],
                          ints, products, out)

    # The reference's tiles and top-k calls, so the same scores land in the same places.
    return tiled_topk(score, b, s, q.size(2), keys.size(1), k, visible, query_block, q.device, score_tile)


def _score_tile(heads: int) -> int | None:
    """The GEMM tile of the routes here: larger where the epilogue is fused."""
    return FUSED_SCORE_TILE if FUSE_EPILOGUE and heads <= FUSED_HEADS else None


def _fused_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, k: int, visible: torch.Tensor,
                query_block: int | None) -> torch.Tensor:
    """The reference's route for fp32 or bf16 queries (its GEMM, tiles and top-k), each tile's
    epilogue fused."""
    b, s, hi = q.shape[:3]
    head_sum_fused = _HEAD_SUMS[q.dtype]
    score_tile = _score_tile(hi)
    workspace = q.new_empty(tile_products(b, s, hi, keys.size(1), query_block, score_tile))

    def score(rows: slice, cols: slice, out: torch.Tensor) -> None:
        q_tile, w_tile, k_tile = q[:, rows], weights[:, rows], keys[:, cols]
        n, t = q_tile.size(1), k_tile.size(1)
        compiled = fused(head_sum_fused, hi, n * hi * t)
        if compiled is None:
            block_scores(q_tile, w_tile, k_tile, workspace, out=out)
            return
        # The reference's own GEMM call (the same fp32 roundings), then the fused rest.
        products = head_products(q_tile.reshape(b, n * hi, -1), k_tile,
                                 workspace[: b * n * hi * t].view(b, n * hi, t))
        for i in range(b):
            if not run_fused(compiled, products[i].view(n, hi, t), w_tile[i], out[i]):
                block_scores(q_tile[i:i + 1], w_tile[i:i + 1], k_tile[i:i + 1], out=out[i:i + 1])

    return tiled_topk(score, b, s, hi, keys.size(1), k, visible, query_block, q.device, score_tile)


_HEAD_SUMS = {torch.float32: head_sum_fp32, torch.bfloat16: head_sum_bf16}
