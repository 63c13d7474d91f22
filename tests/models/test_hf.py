"""Hugging Face import: tiny Llama / Mistral checkpoints written here with safetensors.numpy convert
to horizon run directories whose logits equal an independent numpy forward pass of the HF model
(rotate-half RoPE, grouped-query attention, tied or untied head, linear RoPE scaling); bad
directories give one clear error and write nothing."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import save_file

from horizon.errors import CheckpointError, ConfigError
from horizon.models import load
from horizon.models.hf import convert

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "tools" / "convert_hf.py"
_spec = importlib.util.spec_from_file_location("convert_hf", _SCRIPT)
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
convert_main = _tool.main  # the script's entry point, as `python tools/convert_hf.py` runs it

HF = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
          max_position_embeddings=128, torch_dtype="float16")


def _weights(cfg, seed=0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    M, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D = M // cfg["num_attention_heads"]
    H, G = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = lambda *s: (rng.normal(size=s) * 0.2).astype(dtype)  # noqa: E731
    t = {"model.embed_tokens.weight": w(V, M), "model.norm.weight": (1 + w(M)).astype(dtype)}
    if not cfg.get("tie_word_embeddings", False):
        t["lm_head.weight"] = w(V, M)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": (1 + w(M)).astype(dtype),
              p + "post_attention_layernorm.weight": (1 + w(M)).astype(dtype),
              p + "self_attn.q_proj.weight": w(H * D, M), p + "self_attn.k_proj.weight": w(G * D, M),
              p + "self_attn.v_proj.weight": w(G * D, M), p + "self_attn.o_proj.weight": w(M, H * D),
              p + "mlp.gate_proj.weight": w(F, M), p + "mlp.up_proj.weight": w(F, M),
              p + "mlp.down_proj.weight": w(M, F)}
    return t


def _write(d, cfg, tensors, shards=1):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(d / fname))
        weight_map |= {n: fname for n in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _numpy_llama(cfg, t, tokens):
    """The Hugging Face LlamaForCausalLM forward in float64 numpy, written from its equations."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    M, H, G = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D, eps, T = M // H, cfg["rms_norm_eps"], len(tokens)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, D, 2) / D)
    pos = np.arange(T, dtype=np.float64)
    if cfg.get("rope_scaling"):
        pos = pos / cfg["rope_scaling"]["factor"]
    emb = np.concatenate([np.outer(pos, inv)] * 2, -1)  # [T, D]: cat(freqs, freqs)
    cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]
    rot = lambda x: np.concatenate([-x[..., D // 2:], x[..., : D // 2]], -1)  # noqa: E731  rotate_half

    x = t["model.embed_tokens.weight"][tokens]
    mask = np.tril(np.ones((T, T), bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"])
        q = (h @ t[p + "self_attn.q_proj.weight"].T).reshape(T, H, D)
        k = (h @ t[p + "self_attn.k_proj.weight"].T).reshape(T, G, D)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(T, G, D)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)  # repeat_kv
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
        s = np.where(mask, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v).reshape(T, H * D)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"])
        g = h @ t[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    x = rms(x, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else t["lm_head.weight"]
    return x @ head.T


@pytest.mark.parametrize("variant", ["llama_tied_single", "mistral_untied_sharded_linear_rope"])
def test_converted_logits_match_numpy_hf_forward(tmp_path, variant):
    import jax.numpy as jnp

    cfg = dict(HF, architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True)
    shards = 1
    if variant.startswith("mistral"):
        cfg = dict(HF, architectures=["MistralForCausalLM"], model_type="mistral", tie_word_embeddings=False,
                   sliding_window=None, rope_scaling={"type": "linear", "factor": 2.0})
        shards = 3
    t = _weights(cfg)
    _write(tmp_path / "hf", cfg, t, shards)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    convert_main([str(tmp_path / "hf"), str(tmp_path / "out")])

    model, exp = load(tmp_path / "out")
    assert exp.model.n_kv_heads == 2 and exp.model.tie_embeddings == cfg["tie_word_embeddings"]
    assert (tmp_path / "out" / "tokenizer.json").exists()
    tokens = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=24)
    got = np.asarray(model(jnp.asarray(tokens[None], jnp.int32)))[0]
    want = _numpy_llama(cfg, t, tokens)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def _bad_sharded_missing_file(d):
    cfg = dict(HF, architectures=["LlamaForCausalLM"])
    _write(d, cfg, _weights(cfg), shards=2)
    next(d.glob("model-00002-*.safetensors")).unlink()


def _bad_unmapped_name(d):
    cfg = dict(HF, architectures=["LlamaForCausalLM"])
    _write(d, cfg, _weights(cfg) | {"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float16)})


def _bad_shape(d):
    cfg = dict(HF, architectures=["LlamaForCausalLM"])
    t = _weights(cfg)
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:56]
    _write(d, cfg, t)


def _bad_missing_tensor(d):
    cfg = dict(HF, architectures=["LlamaForCausalLM"])  # untied: lm_head needed
    t = _weights(cfg)
    del t["lm_head.weight"]
    _write(d, cfg, t)


def _bad_architecture(d):
    cfg = dict(HF, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    _write(d, cfg, _weights(dict(HF)))


def _bad_rope_scaling(d):
    cfg = dict(HF, architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "llama3", "factor": 8.0})
    _write(d, cfg, _weights(cfg))


@pytest.mark.parametrize("make, kind, words", [
    (_bad_sharded_missing_file, CheckpointError, "missing"),
    (_bad_unmapped_name, CheckpointError, "q_norm"),
    (_bad_shape, CheckpointError, "up_proj"),
    (_bad_missing_tensor, CheckpointError, "lm_head"),
    (_bad_architecture, ConfigError, "GPT2LMHeadModel"),
    (_bad_rope_scaling, ConfigError, "llama3"),
])
def test_bad_checkpoint_is_one_clear_error_and_writes_nothing(tmp_path, make, kind, words):
    make(tmp_path / "hf")
    with pytest.raises(kind, match=words):
        convert(tmp_path / "hf", tmp_path / "out", log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no temp folder


def test_cli_reports_user_error_on_one_line_and_exits_2(tmp_path, capsys):
    _bad_unmapped_name(tmp_path / "hf")
    with pytest.raises(SystemExit) as e:
        convert_main([str(tmp_path / "hf"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and "q_norm" in err[0]
