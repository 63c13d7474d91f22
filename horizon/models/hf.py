"""Hugging Face Llama / Mistral checkpoints read from a local directory (config.json + safetensors,
one file or shards listed by model.safetensors.index.json; no hub access) and mapped into horizon's
LM (Touvron et al., 2023, Llama 2; Jiang et al., 2023, Mistral 7B). The safetensors format
(Hugging Face, 2022): an 8-byte little-endian header length, a JSON header, then raw tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import shutil
import struct
import tempfile

import numpy as np

from horizon.config import Attention, Data, Experiment, Model, Rope, Train, to_dict
from horizon.errors import CheckpointError, ConfigError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# Buffers some exports carry that are not parameters (recomputed from the config).
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# Files worth keeping next to the converted weights (the tokenizer is not horizon's).
SIDECARS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json")


def _dtype(code: str, where: str):
    import ml_dtypes

    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}
    if code not in table:
        raise CheckpointError(f"{where}: tensor dtype {code} is not supported (quantized export?); convert an "
                              "unquantized (bf16/fp16/fp32) checkpoint")
    return np.dtype(table[code])


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: pathlib.Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo from one .safetensors file's header (no tensor data read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + n + o for o in meta["data_offsets"])
        dtype = _dtype(meta["dtype"], f"{path.name}:{name}")
        shape = tuple(meta["shape"])
        if end > size or end - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} lies outside the file (truncated download?)")
        out[name] = TensorInfo(path, dtype, shape, start, end)
    return out


def index_tensors(src: pathlib.Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in `src`: sharded (index.json) or one model.safetensors."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).exists()]
        if missing:
            raise CheckpointError(f"{src}: {len(missing)} shard(s) listed in {index.name} are missing: "
                                  f"{', '.join(missing[:4])}; download all shards")
        tensors = {}
        for f in files:
            tensors.update(read_header(src / f))
        absent = sorted(n for n, f in weight_map.items() if n not in tensors or tensors[n].file.name != f)
        if absent:
            raise CheckpointError(f"{src}: {index.name} lists {absent[0]} in {weight_map[absent[0]]}, which does "
                                  "not hold it; the shards do not match the index")
        return tensors
    single = src / "model.safetensors"
    if single.exists():
        return read_header(single)
    found = sorted(p.name for p in src.glob("*.safetensors"))
    if found:
        raise CheckpointError(f"{src} has {', '.join(found[:3])} but neither model.safetensors nor "
                              "model.safetensors.index.json; add the index file")
    raise CheckpointError(f"{src} holds no safetensors weights (model.safetensors or an index); "
                          "PyTorch .bin checkpoints are not read")


def load_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor's values (memory-mapped, then copied into a float32 array)."""
    mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.end - info.start,))
    return np.asarray(mm.view(info.dtype).reshape(info.shape), dtype=np.float32)


def _rope(hf: dict) -> Rope:
    rs = hf.get("rope_scaling")
    if not rs:
        return Rope()
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return Rope()
    if kind == "linear":
        return Rope(scaling="linear", factor=float(rs["factor"]))
    raise ConfigError(f"config.json: rope_scaling type {kind!r} has no exact horizon equivalent (supported: "
                      "none, default, linear); horizon.config.Rope would change the frequencies")


def model_config(hf: dict, *, compute_dtype: str = "float32") -> Model:
    """horizon Model for a Hugging Face Llama / Mistral config.json dict; ConfigError if it has
    features horizon's LM does not (biases, another activation, head_dim != hidden/heads)."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES and hf.get("model_type") not in ("llama", "mistral"):
        raise ConfigError(f"config.json: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    try:
        M, H, L = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        V, F = int(hf["vocab_size"]), int(hf["intermediate_size"])
    except KeyError as e:
        raise ConfigError(f"config.json: field {e.args[0]} is missing") from None
    G = int(hf.get("num_key_value_heads") or H)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported; horizon's MLP is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"config.json: {flag}=true is not supported; horizon's linear layers have no bias")
    if hf.get("head_dim") not in (None, M // H):
        raise ConfigError(f"config.json: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                          f"= {M // H}; horizon derives head_dim from d_model and n_heads")
    if F % 8:
        raise ConfigError(f"config.json: intermediate_size {F} is not a multiple of 8 (horizon rounds the "
                          "MLP width to multiples of 8)")
    window = hf.get("sliding_window")
    max_pos = int(hf.get("max_position_embeddings") or 0)
    attention = Attention()
    if window and (not max_pos or int(window) < max_pos):
        attention = Attention(policy="sliding_window", window=int(window))
    base = dict(vocab_size=V, d_model=M, n_layers=L, n_heads=H, n_kv_heads=G, layer_pattern="attn",
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                rope_theta=float(hf.get("rope_theta", 10_000.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                compute_dtype=compute_dtype, attention=attention, rope=_rope(hf))
    ratio = F / M
    for _ in range(8):  # the float ratio may land a hair above F / 8 after ceil; step it down
        cfg = Model(mlp_ratio=ratio, **base)
        if cfg.d_ff == F:
            return cfg
        ratio = math.nextafter(ratio, 0.0)
    raise ConfigError(f"config.json: intermediate_size {F} cannot be expressed as horizon's mlp_ratio")


def name_map(cfg: Model) -> dict[str, tuple[tuple, bool, tuple[int, ...]]]:
    """HF tensor name -> (horizon param path, transpose, expected HF shape)."""
    M, V, F = cfg.d_model, cfg.vocab_size, cfg.d_ff
    H, G, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": (("embed", "embedding"), False, (V, M)),
           "model.norm.weight": (("final_norm", "scale"), False, (M,))}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (("head", "kernel"), True, (V, M))
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (("layers", i, "norm1", "scale"), False, (M,))
        out[p + "post_attention_layernorm.weight"] = (("layers", i, "norm2", "scale"), False, (M,))
        for name, rows in (("q", H * D), ("k", G * D), ("v", G * D)):
            out[p + f"self_attn.{name}_proj.weight"] = (("layers", i, "mixer", name, "kernel"), True, (rows, M))
        out[p + "self_attn.o_proj.weight"] = (("layers", i, "mixer", "o", "kernel"), True, (M, H * D))
        out[p + "mlp.gate_proj.weight"] = (("layers", i, "mlp", "gate", "kernel"), True, (F, M))
        out[p + "mlp.up_proj.weight"] = (("layers", i, "mlp", "up", "kernel"), True, (F, M))
        out[p + "mlp.down_proj.weight"] = (("layers", i, "mlp", "down", "kernel"), True, (M, F))
    return out


def plan(src: str | pathlib.Path, *, compute_dtype: str = "float32"):
    """Validate a HF checkpoint directory without reading tensor data: (hf config, Model, tensors,
    name map). CheckpointError / ConfigError name the first problem."""
    src = pathlib.Path(src)
    if not (src / "config.json").exists():
        raise CheckpointError(f"{src} has no config.json; pass a local Hugging Face model directory")
    try:
        hf = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{src / 'config.json'} is not JSON ({e})") from None
    cfg = model_config(hf, compute_dtype=compute_dtype)
    tensors = index_tensors(src)
    names = name_map(cfg)
    unmapped = sorted(n for n in tensors if n not in names and not IGNORED.fullmatch(n)
                      and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if unmapped:
        raise CheckpointError(f"{src}: {len(unmapped)} tensor(s) do not map into horizon's LM, e.g. "
                              f"{', '.join(unmapped[:3])}; is config.json the one these weights belong to?")
    missing = sorted(n for n in names if n not in tensors)
    if missing:
        raise CheckpointError(f"{src}: {len(missing)} tensor(s) the model needs are missing, e.g. "
                              f"{', '.join(missing[:3])}")
    for n, (_, _, shape) in names.items():
        if tensors[n].shape != shape:
            raise CheckpointError(f"{src}: tensor {n} has shape {tensors[n].shape}, the config implies {shape}")
    return hf, cfg, tensors, names


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def convert(src: str | pathlib.Path, dst: str | pathlib.Path, *, compute_dtype: str = "float32",
            name: str = "hf-import", log=print) -> pathlib.Path:
    """Write `dst` as a horizon run directory (config.json, checkpoints/0 with the parameters)
    from the HF checkpoint in `src`; `horizon.models.load(dst)` returns the model.

    Everything is validated before anything is written, and the directory appears atomically."""
    from horizon.train.checkpoint import save_params

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} already exists and is not empty; pick a new destination directory")
    hf, cfg, tensors, names = plan(src, compute_dtype=compute_dtype)
    params: dict = {}
    for n, (path, transpose, _) in names.items():
        w = load_tensor(tensors[n])
        _set(params, path, np.ascontiguousarray(w.T) if transpose else w)
    max_pos = int(hf.get("max_position_embeddings") or 0)
    exp = Experiment(name=name, claim=f"imported from {src.name} ({(hf.get('architectures') or ['?'])[0]})",
                     model=cfg, data=Data(seq_len=min(max_pos, 2048) if max_pos else 256, batch_size=8),
                     train=Train(steps=1))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(to_dict(exp), indent=2) + "\n")
        (tmp / "hf_source.json").write_text(json.dumps(
            {"source": str(src.resolve()), "architectures": hf.get("architectures"),
             "max_position_embeddings": max_pos, "torch_dtype": hf.get("torch_dtype")}, indent=2) + "\n")
        for f in SIDECARS:
            if (src / f).exists():
                shutil.copy2(src / f, tmp / f)
        save_params(tmp / "checkpoints", params, step=0)
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(t.size for t in _leaves(params))
    log(f"wrote {dst}: {cfg.n_layers} layers, d_model {cfg.d_model}, {n_params / 1e6:.1f}M parameters")
    return dst


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])
