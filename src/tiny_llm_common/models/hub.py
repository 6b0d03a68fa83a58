"""Load a Hugging Face style checkpoint: config.json, *.safetensors and tokenizer files.

Works on a local directory or a hub repo id (downloaded with `huggingface_hub.snapshot_download`,
which shows its own progress bar). Supports Llama, Qwen2 and Qwen3 decoders, in full precision or
quantized the mlx-community way: config.json's `"quantization": {"group_size": .., "bits": ..}`
and, for every quantized `x.weight`, sibling tensors `x.scales` and `x.biases`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from tiny_llm_common.models.errors import ModelLoadError
from tiny_llm_common.tokenizer import Tokenizer
from tiny_llm_common.weights import ModelArgs, QuantizedWeights

# Short names the CLI knows -> hub repos (all ungated: no account needed).
HUB_MODELS = {
    "qwen2-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "llama-3.2-1b": "unsloth/Llama-3.2-1B-Instruct",
}
_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]


def download(repo_id: str) -> Path:
    """Fetch (or find in the hub cache) the files we need from `repo_id`."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_PATTERNS))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not download {repo_id} from the Hugging Face hub ({reason}); check your "
            "network, or pass a local directory holding config.json and *.safetensors"
        ) from None


def args_from_config(config: dict, has_lm_head: bool) -> ModelArgs:
    """ModelArgs from a hub config.json (`has_lm_head`: the checkpoint stores lm_head.weight)."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "qwen2", "qwen3"):
        raise ModelLoadError(
            f"unsupported model_type {model_type!r}: expected 'llama', 'qwen2' or 'qwen3'"
        )
    rope_theta, rope_scaling = config.get("rope_theta"), config.get("rope_scaling")
    params = config.get("rope_parameters")  # transformers 5 nests both here
    if isinstance(params, dict):
        rope_theta = rope_theta or params.get("rope_theta")
        if rope_scaling is None and params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if config.get("mlp_bias"):
        raise ModelLoadError("mlp_bias=true is not supported")
    try:
        return ModelArgs(
            model_type=model_type,
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            vocab_size=config["vocab_size"],
            head_dim=config.get("head_dim"),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            # A tied checkpoint has no lm_head.weight; an untied one must have it.
            tie_word_embeddings=not has_lm_head,
            # Qwen2 always has q/k/v biases (its config has no flag for it).
            attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks {e.args[0]!r}") from None


def _quantization_for(config: dict, prefix: str) -> dict | None:
    """mlx-community's quantization settings for one layer (per-layer entries may override)."""
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return None
    layer = q.get(prefix)
    if isinstance(layer, dict):
        return layer
    return {"group_size": q["group_size"], "bits": q["bits"]}


def load_weights(directory: Path, config: dict) -> dict:
    """All tensors of the checkpoint, quantized triples grouped into `QuantizedWeights`."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {directory}")
    tensors: dict[str, mx.array] = {}
    for f in files:
        tensors.update(mx.load(str(f)))
    out: dict = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")) or "rotary_emb.inv_freq" in name:
            continue
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and f"{prefix}.scales" in tensors:
            q = _quantization_for(config, prefix)
            if q is None:
                raise ModelLoadError(f"{name} is quantized but config.json has no 'quantization'")
            scales, biases = tensors[f"{prefix}.scales"], tensors.get(f"{prefix}.biases")
            if biases is None:
                raise ModelLoadError(f"{prefix}.biases is missing (only affine quantization)")
            n_in = value.shape[-1] * 32 // q["bits"]
            if scales.shape[-1] * q["group_size"] != n_in:
                raise ModelLoadError(
                    f"{name}: scales {scales.shape} do not fit bits={q['bits']}, "
                    f"group_size={q['group_size']}"
                )
            value = QuantizedWeights(value, scales, biases, q["group_size"], q["bits"])
        out[name] = value
    return out


def load_hub_model(name_or_path: str) -> tuple[ModelArgs, dict, Tokenizer, Path]:
    """(args, weights, tokenizer, directory) from a local directory or a hub repo id."""
    directory = Path(name_or_path).expanduser()
    if not directory.is_dir():
        directory = download(HUB_MODELS.get(name_or_path, name_or_path))
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory} has no config.json (expected a hub-style checkpoint)")
    if not (directory / "tokenizer.json").is_file():
        raise ModelLoadError(f"{directory} has no tokenizer.json")
    config = json.loads(config_path.read_text())
    weights = load_weights(directory, config)
    args = args_from_config(config, has_lm_head="lm_head.weight" in weights)
    return args, weights, Tokenizer.from_hub_dir(directory), directory
