"""kvq from PyTorch: INT8 KV-cache quantization, a paged int8 cache and decode attention.

The operations are torch custom ops (``torch.ops.kvq.*``, built from kvq's headers by setup.py):
they run on the current CUDA stream, allocate through torch's allocator, check their arguments
(a ``RuntimeError`` naming the argument), and have fake implementations, so ``torch.compile``
traces them and CUDA-graph capture works. The functions below are thin typed wrappers;
``PagedKvCache`` owns one layer's page pools, block table and free list.

Numeric contract (kvq's): scale = amax / 127 over a group's finite values (1 for a group with
none), code = round-half-even(x / scale) clamped to [-127, 127], NaN -> 0; dequantize is
code * scale rounded to the output dtype. Results are bit-identical to kvq's C++ API.
"""
from __future__ import annotations

import math
import random
from typing import List, Optional, Sequence, Tuple

import torch

from . import _C  # noqa: F401  (registers torch.ops.kvq.*)

__all__ = ["quantize", "quantize_with_scales", "dequantize", "append_kv", "gather_kv", "decode_attention",
           "scale_shape", "PagedKvCache"]

Granularity = str  # "per_token" or "per_channel"


def _groups(extent: int, group: int) -> int:
    return 1 if group <= 0 or group >= extent else (extent + group - 1) // group


def scale_shape(shape: Sequence[int], granularity: Granularity, group: int = 0) -> Tuple[int, ...]:
    """The scales' shape for an x of `shape` ([tokens, channels] or [batch, tokens, channels])."""
    tokens, channels = shape[-2], shape[-1]
    if granularity == "per_token":
        rows, cols = tokens, (_groups(channels, group) if channels > 0 else 0)
    else:
        rows, cols = (_groups(tokens, group) if tokens > 0 else 0), channels
    return (shape[0], rows, cols) if len(shape) == 3 else (rows, cols)


# --- fake (meta) implementations: shapes and dtypes only, for torch.compile and graph capture ----

@torch.library.register_fake("kvq::quantize")
def _quantize_fake(x, granularity, group=0):
    q = torch.empty_strided(x.shape, x.stride(), dtype=torch.int8, device=x.device)
    return q, x.new_empty(scale_shape(x.shape, granularity, group), dtype=torch.float32)


@torch.library.register_fake("kvq::quantize_with_scales")
def _quantize_with_scales_fake(x, scales, granularity, group=0):
    return torch.empty_strided(x.shape, x.stride(), dtype=torch.int8, device=x.device)


@torch.library.register_fake("kvq::dequantize")
def _dequantize_fake(q, scales, granularity, group, dtype):
    return torch.empty_strided(q.shape, q.stride(), dtype=dtype, device=q.device)


@torch.library.register_fake("kvq::append_kv")
def _append_kv_fake(k, v, slot_mapping, k_codes, v_codes, k_scales, v_scales, layout, scheme, seq_ids=None,
                    positions=None, k_open=None, k_sink=None, v_sink=None, error_count=None):
    return None


@torch.library.register_fake("kvq::gather_kv")
def _gather_kv_fake(k_codes, v_codes, k_scales, v_scales, layout, scheme, block_table, seq_lens, dtype, k_open=None,
                    k_sink=None, v_sink=None, seq_ids=None, error_count=None):
    page_size, heads = (k_codes.shape[1], k_codes.shape[2]) if layout == "NHD" else (k_codes.shape[2], k_codes.shape[1])
    tokens = block_table.shape[0] * block_table.shape[1] * page_size
    shape = (tokens, heads, k_codes.shape[3])
    return k_codes.new_empty(shape, dtype=dtype), k_codes.new_empty(shape, dtype=dtype)


@torch.library.register_fake("kvq::decode_attention")
def _decode_attention_fake(q, k_codes, v_codes, k_scales, v_scales, layout, scheme, block_table, seq_lens, sm_scale,
                           max_seq_len, k_open=None, k_sink=None, v_sink=None, seq_ids=None, error_count=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


# --- the dense operations ----------------------------------------------------------------------

def quantize(x: torch.Tensor, granularity: Granularity = "per_token", group: int = 0
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, x's shape and strides) and fp32 scales (scale_shape) of x, [tokens, channels]
    or [batch, tokens, channels] with contiguous channels. group: channels per scale (per_token)
    or tokens per scale (per_channel); 0 is the whole axis."""
    return torch.ops.kvq.quantize(x, granularity, group)


def quantize_with_scales(x: torch.Tensor, scales: torch.Tensor, granularity: Granularity = "per_token",
                         group: int = 0) -> torch.Tensor:
    """Codes of x under given fp32 scales (a scale that is not positive and finite reads as 1)."""
    return torch.ops.kvq.quantize_with_scales(x, scales, granularity, group)


def dequantize(q: torch.Tensor, scales: torch.Tensor, granularity: Granularity = "per_token", group: int = 0,
               dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """float(q) * scale, rounded to dtype (round to nearest even)."""
    return torch.ops.kvq.dequantize(q, scales, granularity, group, dtype)


# --- the paged cache ---------------------------------------------------------------------------

def append_kv(cache: "PagedKvCache", k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
              seq_ids: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None) -> None:
    """Quantizes new tokens' K and V ([tokens, kv_heads, head_dim]) into their slots (int64,
    page * page_size + offset; negative: padding), one launch. Scheme 'keys_per_channel_page' also
    takes each token's sequence id and position (int32)."""
    torch.ops.kvq.append_kv(k, v, slot_mapping, cache.k_codes, cache.v_codes, cache.k_scales, cache.v_scales,
                            cache.layout, cache.scheme, seq_ids, positions, cache.k_open, cache.k_sink, cache.v_sink,
                            cache.error_count)


def gather_kv(cache: "PagedKvCache", block_table: torch.Tensor, seq_lens: torch.Tensor,
              dtype: torch.dtype = torch.float16, seq_ids: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """K and V of sequences dequantized to [batch * max_pages_per_seq * page_size, kv_heads,
    head_dim]: sequence b's token t at row b * max_pages_per_seq * page_size + t."""
    return torch.ops.kvq.gather_kv(cache.k_codes, cache.v_codes, cache.k_scales, cache.v_scales, cache.layout,
                                   cache.scheme, block_table, seq_lens, dtype, cache.k_open, cache.k_sink,
                                   cache.v_sink, seq_ids, cache.error_count)


def decode_attention(cache: "PagedKvCache", q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                     max_seq_len: int, sm_scale: Optional[float] = None, seq_ids: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per sequence (q [batch, q_heads, head_dim], fp16/bf16/fp32)
    over its cached tokens, straight from the int8 pages. Returns out (q's shape and dtype) and the
    log-sum-exp per (sequence, head), fp32. max_seq_len: a static bound on seq_lens (the split of
    the work is planned from it, so a captured call replays with other lengths)."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.kvq.decode_attention(q, cache.k_codes, cache.v_codes, cache.k_scales, cache.v_scales,
                                          cache.layout, cache.scheme, block_table, seq_lens, scale, max_seq_len,
                                          cache.k_open, cache.k_sink, cache.v_sink, seq_ids, cache.error_count)


class PagedKvCache:
    """One layer's paged int8 KV cache for up to `max_seqs` sequences: the page pools, a block
    table [max_seqs, max_pages_per_seq] (int32, -1 where no page), the sequences' lengths and a free
    list of pages, kept on the host and mirrored to the device. Sequence ids are row indices.

    scheme 'per_token_head': a scale per (page, token, head) for K and V; 'keys_per_channel_page':
    keys per channel per page (their open page held in `dtype` until it fills), values per token,
    the first `sink_tokens` keys and values of each sequence kept in full precision.
    `error_count` (int64 [1]) counts the untrusted tokens and table entries kvq skipped."""

    def __init__(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int, max_seqs: int,
                 max_pages_per_seq: int, scheme: str = "per_token_head", layout: str = "NHD",
                 dtype: torch.dtype = torch.float16, sink_tokens: int = 0, device: str | torch.device = "cuda",
                 seed: int = 0):
        if layout not in ("NHD", "HND"):
            raise ValueError(f"layout must be 'NHD' or 'HND', got {layout!r}")
        if scheme not in ("per_token_head", "keys_per_channel_page"):
            raise ValueError(f"scheme must be 'per_token_head' or 'keys_per_channel_page', got {scheme!r}")
        if sink_tokens and scheme != "keys_per_channel_page":
            raise ValueError("sink_tokens needs scheme 'keys_per_channel_page'")
        self.num_pages, self.page_size, self.kv_heads, self.head_dim = num_pages, page_size, kv_heads, head_dim
        self.max_seqs, self.max_pages_per_seq = max_seqs, max_pages_per_seq
        self.scheme, self.layout, self.dtype = scheme, layout, dtype
        shape = (num_pages, page_size, kv_heads, head_dim) if layout == "NHD" else (num_pages, kv_heads, page_size, head_dim)
        self.k_codes = torch.zeros(shape, dtype=torch.int8, device=device)
        self.v_codes = torch.zeros(shape, dtype=torch.int8, device=device)
        token_scales = (num_pages, page_size, kv_heads)
        by_page = scheme == "keys_per_channel_page"
        self.k_scales = torch.ones((num_pages, kv_heads, head_dim) if by_page else token_scales, device=device)
        self.v_scales = torch.ones(token_scales, device=device)
        self.k_open = torch.zeros((max_seqs, page_size, kv_heads, head_dim), dtype=dtype, device=device) if by_page else None
        sinks = (max_seqs, sink_tokens, kv_heads, head_dim)
        self.k_sink = torch.zeros(sinks, dtype=dtype, device=device) if sink_tokens else None
        self.v_sink = torch.zeros(sinks, dtype=dtype, device=device) if sink_tokens else None
        self.error_count = torch.zeros(1, dtype=torch.int64, device=device)
        self.block_table = torch.full((max_seqs, max_pages_per_seq), -1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self._table = [[-1] * max_pages_per_seq for _ in range(max_seqs)]
        self._lens = [0] * max_seqs
        self._free = list(range(num_pages))
        random.Random(seed).shuffle(self._free)  # pages handed out in no particular order, as an engine's

    def length(self, seq: int) -> int:
        return self._lens[seq]

    def plan(self, seqs: Sequence[int], counts: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Room for counts[i] new tokens of sequence seqs[i] (pages taken from the free list):
        the rows' slot mapping (int64), sequence ids and positions (int32), on the device, in the
        order an engine lays out a batch (each sequence's tokens consecutive)."""
        slots, ids, positions = [], [], []
        for s, n in zip(seqs, counts):
            for _ in range(n):
                pos = self._lens[s]
                page_index = pos // self.page_size
                if page_index >= self.max_pages_per_seq:
                    raise RuntimeError(f"kvq: sequence {s} is full ({pos} tokens)")
                if self._table[s][page_index] < 0:
                    if not self._free:
                        raise RuntimeError("kvq: the cache is out of pages")
                    self._table[s][page_index] = self._free.pop()
                slots.append(self._table[s][page_index] * self.page_size + pos % self.page_size)
                ids.append(s)
                positions.append(pos)
                self._lens[s] += 1
        device = self.k_codes.device
        self.block_table.copy_(torch.tensor(self._table, dtype=torch.int32))
        self.seq_lens.copy_(torch.tensor(self._lens, dtype=torch.int32))
        return (torch.tensor(slots, dtype=torch.int64, device=device), torch.tensor(ids, dtype=torch.int32, device=device),
                torch.tensor(positions, dtype=torch.int32, device=device))

    def append(self, k: torch.Tensor, v: torch.Tensor, seqs: Sequence[int], counts: Sequence[int]) -> None:
        """Appends the rows of k and v ([sum(counts), kv_heads, head_dim]) to the sequences."""
        slots, ids, positions = self.plan(seqs, counts)
        append_kv(self, k, v, slots, ids, positions)

    def tables(self, seqs: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block table, lengths and ids (int32, device) of the sequences, in that order."""
        idx = torch.tensor(list(seqs), dtype=torch.int64, device=self.k_codes.device)
        return self.block_table.index_select(0, idx), self.seq_lens.index_select(0, idx), idx.to(torch.int32)

    def attend(self, q: torch.Tensor, seqs: Sequence[int], sm_scale: Optional[float] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """decode_attention of q[i] over sequence seqs[i]."""
        table, lens, ids = self.tables(seqs)
        max_len = self.max_pages_per_seq * self.page_size
        return decode_attention(self, q, table, lens, max_len, sm_scale, ids)

    def gather(self, seqs: Sequence[int], dtype: Optional[torch.dtype] = None
               ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The sequences' K and V dequantized: one [length, kv_heads, head_dim] tensor each."""
        table, lens, ids = self.tables(seqs)
        k, v = gather_kv(self, table, lens, dtype or self.dtype, ids)
        span = self.max_pages_per_seq * self.page_size
        ks = [k[i * span:i * span + self._lens[s]] for i, s in enumerate(seqs)]
        vs = [v[i * span:i * span + self._lens[s]] for i, s in enumerate(seqs)]
        return ks, vs

    def free(self, seq: int) -> None:
        """Returns a sequence's pages to the free list; its id can be reused (positions from 0)."""
        self._free += [p for p in self._table[seq] if p >= 0]
        self._table[seq] = [-1] * self.max_pages_per_seq
        self._lens[seq] = 0
        self.block_table[seq].fill_(-1)
        self.seq_lens[seq] = 0
