"""Load a Llama-architecture GGUF file into the hub's tensor names.

MLX reads GGUF directly (`mx.load(path, return_metadata=True)`) and turns the Q4_0, Q4_1 and Q8_0
blocks into its own affine quantized format: packed uint32 weights plus per-group scales and
biases. What is left for us:

* renaming llama.cpp's tensors (`blk.3.attn_q.weight`) to the hub's
  (`model.layers.3.self_attn.q_proj.weight`), the names the course's `Model` takes;
* undoing llama.cpp's row permutation of the query and key projections. Its converter reorders
  each head's rows so that a head's two rotary halves are interleaved (pairs `2i, 2i+1`) instead of
  split (`i, i + head_dim/2`), because llama.cpp uses interleaved ("traditional") RoPE. We put the
  rows back in the Hugging Face order so that the standard, non-interleaved RoPE that the course
  teaches gives the same model.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from tiny_llm_common.models.errors import ModelLoadError
from tiny_llm_common.weights import ModelArgs, QuantizedWeights

# llama.cpp's per-layer tensor names -> the hub's.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def load_gguf(path: str | Path, unpermute: bool = True) -> tuple[ModelArgs, dict, dict]:
    """Read a Llama GGUF: (ModelArgs, weights in the hub's names, the GGUF metadata).

    `unpermute=False` keeps llama.cpp's Q/K row order (then only interleaved RoPE is right)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such GGUF file: {path}")
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot read {path} as GGUF: {e}") from None
    args = args_from_metadata(metadata, has_output="output.weight" in tensors)
    return args, convert_tensors(tensors, args, unpermute=unpermute), metadata


_REQUIRED = object()


def _meta(metadata: dict, key: str, default=_REQUIRED):
    """A scalar metadata value as a Python number (GGUF scalars load as 0-d mx.arrays)."""
    if key not in metadata:
        if default is _REQUIRED:
            raise ModelLoadError(f"GGUF metadata lacks {key!r}")
        return default
    value = metadata[key]
    return value.item() if isinstance(value, mx.array) else value


def _float32(x) -> float:
    """GGUF stores floats as float32; keep the short decimal they were written from (1e-05)."""
    return float(str(np.float32(x)))


def args_from_metadata(metadata: dict, has_output: bool) -> ModelArgs:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}: only 'llama' is supported")
    n_heads = int(_meta(metadata, "llama.attention.head_count"))
    hidden = int(_meta(metadata, "llama.embedding_length"))
    vocab = _meta(metadata, "llama.vocab_size", None) or len(metadata["tokenizer.ggml.tokens"])
    return ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=int(_meta(metadata, "llama.block_count")),
        intermediate_size=int(_meta(metadata, "llama.feed_forward_length")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(_meta(metadata, "llama.attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        head_dim=int(_meta(metadata, "llama.rope.dimension_count", hidden // n_heads)),
        rms_norm_eps=_float32(_meta(metadata, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_float32(_meta(metadata, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_meta(metadata, "llama.context_length", 4096)),
        tie_word_embeddings=not has_output,
    )


def hub_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    raise ModelLoadError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row order: per head, rows (0, 1, 2, 3, ...) held the HF rows
    (0, D/2, 1, D/2 + 1, ...). Works on anything with one row per output feature (quantized
    weights, scales, biases, bias vectors) because quantization groups run along the columns."""
    rows = x.shape[0]
    head_dim = rows // n_heads
    if rows % n_heads or head_dim % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    rest = x.shape[1:]
    x = x.reshape(n_heads, head_dim // 2, 2, *rest)
    return x.swapaxes(1, 2).reshape(rows, *rest)


def _in_features(hub: str, args: ModelArgs) -> int:
    if hub.endswith("o_proj.weight"):
        return args.num_attention_heads * args.head_dim
    if hub.endswith("down_proj.weight"):
        return args.intermediate_size
    return args.hidden_size


def _quantized(hub: str, w: mx.array, scales: mx.array, biases: mx.array, args: ModelArgs):
    """Wrap a quantized tensor, reading bits and group size off its shapes."""
    n_in = _in_features(hub, args)
    bits, bits_rem = divmod(w.shape[1] * 32, n_in)
    group, group_rem = divmod(n_in, scales.shape[1])
    if bits_rem or group_rem or bits not in (2, 3, 4, 5, 6, 8) or scales.shape != biases.shape:
        raise ModelLoadError(
            f"{hub}: packed shape {w.shape} and scales {scales.shape} do not fit {n_in} inputs"
        )
    return QuantizedWeights(weight=w, scales=scales, biases=biases, group_size=group, bits=bits)


def convert_tensors(tensors: dict[str, mx.array], args: ModelArgs, unpermute: bool = True) -> dict:
    """Rename to the hub's names, group quantized triples, un-permute Q and K."""
    out: dict = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        hub = hub_name(name)
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is not None and f"{base}.scales" in tensors:
            value = _quantized(
                hub, value, tensors[f"{base}.scales"], tensors[f"{base}.biases"], args
            )
        n_heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}.get(
            hub.split(".")[-2]
        )
        if unpermute and n_heads is not None:
            if isinstance(value, QuantizedWeights):
                value.weight, value.scales, value.biases = (
                    unpermute_rows(a, n_heads) for a in (value.weight, value.scales, value.biases)
                )
            else:
                value = unpermute_rows(value, n_heads)
        out[hub] = value
    return out
