"""Week 2 Day 1 (the contiguous KV cache) and Day 6 (a batch of them, left-padded).

A cache object is what the model's attention layers talk to (CONTRIBUTING.md, "The model
contract"): `offset` is the position of the first new token (the RoPE offset) and
`attend(q, k, v, scale)` stores the new keys and values and attends over everything stored.

Chapters: book/src/week2-01-kv-cache.md (Day 1), book/src/week2-06-batching.md (Day 6).
"""

from __future__ import annotations

import mlx.core as mx

from .attention import causal_mask, scaled_dot_product_attention_grouped  # noqa: F401

# Capacity grows in chunks of this many tokens (mlx-lm uses the same step): one copy of the
# cache per 256 tokens instead of one per token, and at most 255 unused slots per layer.
DEFAULT_STEP = 256


def _check_kv(q: mx.array, k: mx.array, v: mx.array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attend needs 4-D [B, H, L, D] arrays, got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"keys {k.shape} and values {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"queries {q.shape} and keys {k.shape} disagree on B, L or D")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")


def _grown(keys, values, k: mx.array, v: mx.array, capacity: int):
    """Buffers of `capacity` tokens holding `keys`/`values` (None: empty) in their first slots."""
    B, H, _, D = k.shape
    used = 0 if keys is None else keys.shape[2]
    k_more = mx.zeros((B, H, capacity - used, D), dtype=k.dtype)
    v_more = mx.zeros((B, H, capacity - used, v.shape[3]), dtype=v.dtype)
    if keys is None:
        return k_more, v_more
    # One copy of everything stored, once per `step` tokens rather than once per token.
    return mx.concatenate([keys, k_more], axis=2), mx.concatenate([values, v_more], axis=2)


class KVCache:
    """One layer's keys and values in one contiguous buffer [B, H_kv, capacity, D].

    `max_len=None` grows the buffer `step` tokens at a time; `max_len=n` allocates n tokens at
    the first call and refuses to go past them (the "reserve the maximum length" policy whose
    waste Day 3 measures).
    """

    def __init__(self, max_len: int | None = None, step: int = DEFAULT_STEP):
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be None or an int >= 1, got {max_len!r}")
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1, got {step!r}")
        self.max_len = max_len
        self.step = step
        self.keys: mx.array | None = None  # [B, H_kv, capacity, D]; slots past offset unused
        self.values: mx.array | None = None
        self._offset = 0

    @property
    def offset(self) -> int:
        """Tokens stored so far: the position of the next token."""
        return self._offset

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[None, None]:
        """The stored keys and values, [B, H_kv, offset, D] each (None before the first call)."""
        if self.keys is None:
            return None, None
        return self.keys[..., : self._offset, :], self.values[..., : self._offset, :]

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold, used or not (capacity, not offset)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def _reserve(self, k: mx.array, v: mx.array, need: int) -> None:
        """Make room for `need` tokens in total, keeping what is stored."""
        # TODO(Week 2 Day 1, task 1):
        # - capacity = the buffers' length along axis 2 (0 before the first call); enough room
        #   already: return.
        # - with self.max_len: need > max_len is a ValueError ("KV cache full ..."); otherwise
        #   the new capacity is max_len (allocated once, at the first call).
        # - without: round `need` up to a multiple of self.step.
        # - self.keys, self.values = _grown(self.keys, self.values, k, v, new_capacity)
        raise NotImplementedError(
            "Week 2 Day 1, task 1: implement `KVCache._reserve` in src/tiny_llm/kv_cache.py"
        )

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """Store k, v ([B, H_kv, L, D]) after the cached tokens; attend q ([B, H_q, L, D]).

        Query i (0-based among the L new ones) sits at position offset + i and sees keys
        0 .. offset + i: all cached keys and the new ones up to itself.
        """
        _check_kv(q, k, v)
        if self.keys is not None and (
            k.shape[0] != self.keys.shape[0]
            or k.shape[1] != self.keys.shape[1]
            or k.shape[3] != self.keys.shape[3]
        ):
            raise ValueError(f"keys {k.shape} do not fit a cache holding {self.keys.shape}")
        # TODO(Week 2 Day 1, task 2):
        # 1. L new tokens go to slots offset .. offset + L: self._reserve(k, v, offset + L),
        #    then write them with slice assignment: self.keys[..., start:end, :] = k (same for v).
        # 2. Advance self._offset.
        # 3. Attend over the stored slots only (self.keys[..., :end, :]) with your Week 1
        #    scaled_dot_product_attention_grouped. Mask: none for L == 1 (the new token sees
        #    everything); causal_mask(L, end, q.dtype) for a chunk (queries are the last L keys).
        raise NotImplementedError(
            "Week 2 Day 1, task 2: implement `KVCache.attend` in src/tiny_llm/kv_cache.py"
        )


def _num_layers(model_or_args) -> int:
    args = getattr(model_or_args, "args", model_or_args)
    n = getattr(args, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise TypeError(
            f"make_cache needs a Model or ModelArgs (num_hidden_layers), got {type(model_or_args)}"
        )
    return n


def make_cache(
    model_or_args, max_len: int | None = None, step: int = DEFAULT_STEP
) -> list[KVCache]:
    """One empty `KVCache` per layer of the model."""
    return [KVCache(max_len, step) for _ in range(_num_layers(model_or_args))]


class BatchKVCache:
    """One layer's cache for B sequences decoded together, left-padded to a common length.

    Row b's first `left_padding[b]` columns hold padding; its real tokens follow, so every
    row's newest token is in the same column and one [B, 1] step decodes them all. `offset` is
    per row: column index minus padding, the true position of the next token (RoPE needs it).
    During the padded prefill the padding tokens get negative positions; the mask hides them.
    """

    def __init__(self, left_padding: list[int], step: int = DEFAULT_STEP):
        pads = [int(p) for p in left_padding]
        if not pads or min(pads) < 0:
            raise ValueError(f"left_padding must be a non-empty list of ints >= 0, got {pads}")
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1, got {step!r}")
        self.step = step
        self.left_padding = mx.array(pads, dtype=mx.int32)  # [B]
        self.keys: mx.array | None = None  # [B, H_kv, capacity, D]
        self.values: mx.array | None = None
        self._idx = 0  # columns written, the same for every row

    @property
    def batch_size(self) -> int:
        return self.left_padding.shape[0]

    @property
    def offset(self) -> mx.array:
        """[B] int32: tokens of each sequence stored so far (negative inside the padding)."""
        return self._idx - self.left_padding

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """As KVCache.attend, and no query sees its row's padding columns."""
        _check_kv(q, k, v)
        if k.shape[0] != self.batch_size:
            raise ValueError(f"batch of {k.shape[0]} sequences, the cache has {self.batch_size}")
        # TODO(Week 2 Day 6, task 1):
        # 1. Store k, v in columns self._idx .. self._idx + L, growing the buffers with _grown
        #    to a multiple of self.step when they are too short; advance self._idx.
        # 2. Build an additive mask [B, 1, L, S] (S = columns written): the query in column c
        #    of row b sees columns pad[b] .. c. Also let every query see its own column: a
        #    padding query would otherwise see nothing, softmax to NaN, and the NaN keys of the
        #    next layer leak through the mask (NaN + -inf is NaN).
        # 3. scaled_dot_product_attention_grouped over the written columns with that mask.
        raise NotImplementedError(
            "Week 2 Day 6, task 1: implement `BatchKVCache.attend` in src/tiny_llm/kv_cache.py"
        )

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep` (finished sequences leave the batch) and drop the columns
        that are now padding in every remaining row."""
        keep = [int(i) for i in keep]
        if not keep or min(keep) < 0 or max(keep) >= self.batch_size:
            raise ValueError(f"keep must list rows 0..{self.batch_size - 1}, got {keep}")
        # TODO(Week 2 Day 6, task 2): select the rows `keep` of left_padding, keys and values
        # (index axis 0 with an mx.array of the row numbers); then trim = the smallest padding
        # left (at most self._idx): drop that many leading columns from keys and values,
        # subtract it from every padding and from self._idx.
        raise NotImplementedError(
            "Week 2 Day 6, task 2: implement `BatchKVCache.filter` in src/tiny_llm/kv_cache.py"
        )


def make_batch_cache(
    model_or_args, left_padding: list[int], step: int = DEFAULT_STEP
) -> list[BatchKVCache]:
    """One empty `BatchKVCache` per layer for a batch with these left paddings."""
    return [BatchKVCache(left_padding, step) for _ in range(_num_layers(model_or_args))]
