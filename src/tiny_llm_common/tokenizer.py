"""The course's tokenizer: byte-level BPE from a GGUF file's metadata or a hub `tokenizer.json`.

Built on the `tokenizers` library (the Rust BPE Hugging Face uses) so encoding is exact and fast;
the chat template is rendered with jinja2 the way `transformers` does it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

_SPECIAL_TOKEN_TYPE = 3  # GGUF token_type: 1 normal, 3 control (special)


class Tokenizer:
    """Encode/decode text, render chat prompts, know the end-of-sequence tokens."""

    def __init__(
        self,
        backend: _HFTokenizer,
        chat_template: str | None,
        eos_token_ids: set[int],
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        self._tok = backend
        self.chat_template = chat_template
        self.eos_token_ids = set(eos_token_ids)
        self.bos_token = bos_token
        self.eos_token = eos_token

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> Tokenizer:
        """A GPT-2 style ("gpt2" model) byte-level BPE from `tokenizer.ggml.*` metadata."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r}: expected 'gpt2' (BPE)")
        tokens = list(metadata["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
        types = np.array(metadata["tokenizer.ggml.token_type"])
        backend = _HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        # llama.cpp's "smollm" pre-tokenizer: every digit alone, then GPT-2's regex split.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        specials = [tokens[i] for i in np.nonzero(types == _SPECIAL_TOKEN_TYPE)[0]]
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in specials]
        )

        def token_at(key: str) -> str | None:
            return tokens[int(metadata[key].item())] if key in metadata else None

        eos = {int(metadata["tokenizer.ggml.eos_token_id"].item())}
        # A raw (non-chat) prompt may end its document with <|endoftext|>: stop there too.
        if "<|endoftext|>" in specials:
            eos.add(tokens.index("<|endoftext|>"))
        return cls(
            backend,
            metadata.get("tokenizer.chat_template"),
            eos,
            bos_token=token_at("tokenizer.ggml.bos_token_id"),
            eos_token=token_at("tokenizer.ggml.eos_token_id"),
        )

    @classmethod
    def from_hub_dir(cls, directory: str | Path) -> Tokenizer:
        """From a hub snapshot: tokenizer.json, tokenizer_config.json (chat template, eos) and
        the eos ids in generation_config.json / config.json."""
        d = Path(directory)
        backend = _HFTokenizer.from_file(str(d / "tokenizer.json"))
        config = _read_json(d / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        for extra in ("chat_template.jinja",):  # newer snapshots keep it in its own file
            if template is None and (d / extra).is_file():
                template = (d / extra).read_text()

        def content(tok) -> str | None:
            return tok.get("content") if isinstance(tok, dict) else tok

        eos_token = content(config.get("eos_token"))
        eos: set[int] = set()
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            eos.add(backend.token_to_id(eos_token))
        for name in ("generation_config.json", "config.json"):
            ids = _read_json(d / name).get("eos_token_id")
            eos.update([ids] if isinstance(ids, int) else ids or [])
        return cls(backend, template, eos, content(config.get("bos_token")), eos_token)

    # -- the API -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are
        recognised either way; `add_special_tokens` adds the tokenizer's own BOS/EOS, if any."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": "user", "content": "..."}]) with the model's template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template: use a raw prompt (--no-chat)")
        return _compile(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turn generated token ids into text as they arrive.

    A token may end in the middle of a UTF-8 character (byte-level BPE splits "é" or an emoji
    across tokens); decoding it alone would print U+FFFD. We keep the ids since the last complete
    character and only release text once it decodes cleanly.
    """

    _MAX_PENDING = 8  # a character is at most 4 bytes; past this the bytes are really invalid

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._pending: list[int] = []
        self._unread = ""
        self.text = ""  # everything released so far
        self.tokens: list[int] = []

    def add_token(self, token_id: int) -> None:
        self.tokens.append(int(token_id))
        self._pending.append(int(token_id))
        piece = self._tokenizer.decode(self._pending)
        if piece.endswith("\ufffd") and len(self._pending) < self._MAX_PENDING:
            return
        self._release(piece)

    def finalize(self) -> None:
        """Release whatever is held back (at the end of generation)."""
        if self._pending:
            self._release(self._tokenizer.decode(self._pending))

    def _release(self, piece: str) -> None:
        self._pending.clear()
        self._unread += piece
        self.text += piece

    @property
    def last_segment(self) -> str:
        """The text released since the previous read of `last_segment`."""
        out, self._unread = self._unread, ""
        return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _raise(message: str):
    raise ValueError(f"chat template: {message}")


_TEMPLATES: dict[str, object] = {}


def _compile(source: str):
    """Compile a chat template the way `transformers` does (sandboxed, trim/lstrip blocks)."""
    if source not in _TEMPLATES:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
