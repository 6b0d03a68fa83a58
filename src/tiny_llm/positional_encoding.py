"""Week 1 Day 2: rotary positional embeddings (RoPE), both layouts.

Chapter: book/src/week1-02-rope.md.
"""

import mlx.core as mx


class RoPE:
    """Rotate pairs of features by position-dependent angles.

    traditional=True pairs neighbouring features (0,1), (2,3), ... (the original paper, GGUF);
    traditional=False pairs feature i with i + dims/2 (the Hugging Face "rotate_half" layout).
    """

    def __init__(
        self,
        dims: int,
        seq_len: int,
        base: float = 10000.0,
        traditional: bool = False,
        freqs: mx.array | None = None,
    ):
        if dims % 2:
            raise ValueError(f"RoPE needs an even number of dims, got {dims}")
        self.dims = dims
        self.seq_len = seq_len
        self.traditional = traditional
        half = dims // 2
        if freqs is None:  # inverse frequencies base^(-2i/dims)
            freqs = 1.0 / (base ** (mx.arange(0, half, dtype=mx.float32) / half))
        if freqs.shape != (half,):
            raise ValueError(f"freqs must have shape ({half},), got {freqs.shape}")
        self.freqs = freqs.astype(mx.float32)  # [dims/2]: the angle per position of each pair
        # TODO(Week 1 Day 2, task 1): precompute the tables __call__ reads, for every position
        # 0 .. seq_len - 1 and every pair i:
        #   angles    = position * self.freqs[i]   -> [seq_len, dims/2], float32
        #   self.cos  = mx.cos(angles)             -> [seq_len, dims/2]
        #   self.sin  = mx.sin(angles)             -> [seq_len, dims/2]
        # (mx.arange(seq_len, dtype=mx.float32)[:, None] * self.freqs[None, :] builds the angles.)
        raise NotImplementedError(
            "Week 1 Day 2, task 1: implement `RoPE.__init__` in src/tiny_llm/positional_encoding.py"
        )

    def __call__(self, x: mx.array, offset: "int | list[int] | mx.array" = 0) -> mx.array:
        """x: [B, L, H, D]; offset: the position of x[:, 0], one int or one per sequence."""
        B, L, H, D = x.shape
        if D != self.dims:
            raise ValueError(f"RoPE built for {self.dims} dims, input has {D}")
        self._check_offset(offset, B, L)
        # TODO(Week 1 Day 2, task 2):
        # - positions: mx.array(offset, dtype=mx.int32).reshape(-1, 1) + mx.arange(L)[None, :]
        #   -> [1 or B, L] (one offset for the batch, or one per sequence);
        # - cos = self.cos[positions] -> [1 or B, L, D/2]; add a heads axis -> [1 or B, L, 1, D/2];
        #   same for sin;
        # - compute in float32; split x into the two halves of each pair (x1, x2), each
        #   [B, L, H, D/2]:
        #     traditional=True : x1 = x[..., 0::2], x2 = x[..., 1::2] (reshape to [..., D/2, 2]),
        #     traditional=False: x1 = x[..., :D/2], x2 = x[..., D/2:];
        # - rotate: (x1 * cos - x2 * sin, x1 * sin + x2 * cos), put the halves back in the same
        #   layout (interleave with mx.stack(..., axis=-1).reshape, or mx.concatenate);
        # - cast back to x.dtype.
        raise NotImplementedError(
            "Week 1 Day 2, task 2: implement `RoPE.__call__` in src/tiny_llm/positional_encoding.py"
        )

    def _check_offset(self, offset, batch: int, length: int) -> None:
        """Host-side checks for int / list offsets. An mx.array is not checked: reading it
        would force a device sync on every layer; the cache that produces it keeps it in range."""
        if isinstance(offset, mx.array):
            if offset.ndim > 1 or offset.size not in (1, batch):
                raise ValueError(f"offset array must have 1 or {batch} entries, got {offset.shape}")
            return
        offs = list(offset) if isinstance(offset, list | tuple) else [offset]
        if len(offs) not in (1, batch):
            raise ValueError(f"need 1 or {batch} offsets, got {len(offs)}")
        if min(offs) < 0 or max(offs) + length > self.seq_len:
            raise ValueError(
                f"positions {min(offs)}..{max(offs) + length - 1} outside the table "
                f"of {self.seq_len} positions (seq_len)"
            )
