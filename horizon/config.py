"""Experiment configuration: frozen, keyword-only dataclasses, one per concern, nested in Experiment.

`__post_init__` only validates (tyro may run it twice) and raises ConfigError naming the dotted
field and the fix; derived values are properties.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from horizon.errors import ConfigError

frozen = dataclasses.dataclass(frozen=True, kw_only=True)

# Names a layer pattern may use; horizon.models.blocks maps each to its mixer module.
MIXERS = ("attn", "ssd")


def _require(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {msg}")


@frozen
class Attention:
    """How attention layers select keys. `policy` names a horizon.attention policy."""

    policy: str = "dense_causal"
    block: int = 64  # query/key block of the sparse-attention kernel; seq_len must be a multiple
    window: int = 0  # sliding window in tokens (policies that use one)
    n_sinks: int = 0  # attention-sink tokens (StreamingLLM)
    softcap: float = 0.0  # logit soft-cap, 0 = off
    implementation: str | None = None  # None: pallas on GPU, xla (gathers live blocks) on CPU
    options: str = ""  # further policy arguments, "budget=8,stride=4" (see horizon.attention.policies)

    def __post_init__(self):
        from horizon.attention.policies import POLICIES  # the policy names live with the policies

        if self.policy not in POLICIES:
            raise ConfigError(f"model.attention.policy: unknown policy {self.policy!r}; "
                              f"choose one of {', '.join(sorted(POLICIES))}")
        _ = self.policy_options  # validates the syntax
        _require(self.block >= 1, "model.attention.block", f"{self.block} must be >= 1")
        _require(self.window >= 0, "model.attention.window", f"{self.window} must be >= 0")
        _require(self.n_sinks >= 0, "model.attention.n_sinks", f"{self.n_sinks} must be >= 0")

    @property
    def policy_options(self) -> dict:
        """`options` parsed: "budget=8,stride=4" -> {"budget": 8, "stride": 4} (ints, floats, words)."""
        return parse_options(self.options, "model.attention.options")


def parse_options(text: str, field: str) -> dict:
    """"budget=8,stride=4" -> {"budget": 8, "stride": 4} (ints, floats, words); ConfigError naming `field`."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{field}: {item!r} is not key=value; write e.g. 'budget=8,stride=4'")
        value = value.strip()
        for conv in (int, float):
            try:
                value = conv(value)
                break
            except ValueError:
                pass
        out[key.strip()] = value
    return out


@frozen
class SSM:
    """Mamba-2 (SSD) mixer sizes and initialisation ranges (Dao & Gu, 2024)."""

    state_size: int = 64  # N
    head_dim: int = 32  # P
    n_groups: int = 1  # G: B and C are shared by the heads of a group
    expand: int = 2  # inner width = expand * d_model
    conv_width: int = 4
    chunk: int = 64
    dt_min: float = 1e-3
    dt_max: float = 0.1
    a_init_min: float = 1.0
    a_init_max: float = 16.0

    def __post_init__(self):
        for name in ("state_size", "head_dim", "n_groups", "expand", "conv_width", "chunk"):
            v = getattr(self, name)
            _require(v >= 1, f"model.ssm.{name}", f"{v} must be >= 1")
        _require(0 < self.dt_min <= self.dt_max, "model.ssm.dt_min", "need 0 < dt_min <= dt_max")
        _require(0 < self.a_init_min <= self.a_init_max, "model.ssm.a_init_min", "need 0 < a_init_min <= a_init_max")


@frozen
class Quant:
    """Low-precision treatment of linear layers: a horizon.quant recipe preset by name."""

    recipe: str = "bf16"  # "bf16" keeps every GEMM in high precision
    high_precision_from: float | None = None  # fraction of training after which to switch (NVFP4 paper, app. D)
    high_precision_scope: Literal["fprop", "all"] = "fprop"

    def __post_init__(self):
        from horizon.quant.recipe import PRESETS  # the recipe names live with the recipes

        if self.recipe not in PRESETS:
            raise ConfigError(f"model.quant.recipe: unknown recipe {self.recipe!r}; presets: {', '.join(PRESETS)}")
        if self.high_precision_from is not None:
            _require(0.0 <= self.high_precision_from <= 1.0, "model.quant.high_precision_from",
                     f"{self.high_precision_from} must be in [0, 1]")


ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic_ntk", "yarn")


@frozen
class Rope:
    """RoPE frequency scaling for context extension (horizon.attention.rope): position
    interpolation, NTK-aware, dynamic NTK, YaRN. The base theta is `Model.rope_theta` (raise it for
    ProLong-style large-theta training)."""

    scaling: Literal["none", "linear", "ntk", "dynamic_ntk", "yarn"] = "none"
    factor: float = 1.0  # s = extended length / original length (linear, ntk, yarn)
    original_length: int = 0  # L: the length the model was trained at (needed by yarn, dynamic_ntk)
    yarn_alpha: float = 1.0  # YaRN ramp: dims turning fewer than alpha times in L are interpolated
    yarn_beta: float = 32.0  # YaRN ramp: dims turning more than beta times in L are left unchanged

    def __post_init__(self):
        _require(self.scaling in ROPE_SCALINGS, "model.rope.scaling",
                 f"{self.scaling!r} is unknown; choose one of {', '.join(ROPE_SCALINGS)}")
        _require(self.factor >= 1.0, "model.rope.factor",
                 f"{self.factor} is below 1, which would shrink the context; set it to "
                 "extended length / trained length (>= 1), or 1 for no scaling")
        _require(self.original_length >= 0, "model.rope.original_length", f"{self.original_length} must be >= 0")
        if self.scaling in ("yarn", "dynamic_ntk"):
            _require(self.original_length >= 1, "model.rope.original_length",
                     f"{self.scaling} needs the trained length; set model.rope.original_length to it "
                     "(the training data.seq_len)")
        _require(0 < self.yarn_alpha < self.yarn_beta, "model.rope.yarn_alpha",
                 f"need 0 < yarn_alpha ({self.yarn_alpha}) < yarn_beta ({self.yarn_beta})")


OBJECTIVE_MTP = ("none", "parallel", "sequential")


@frozen
class Objective:
    """Training objective on top of next-token prediction (horizon.models.heads): multi-token
    prediction, parallel heads (Gloeckle et al., 2024) or sequential modules (DeepSeek-V3, 2024),
    and horizon-length prediction on fill-in-the-middle samples (Ding et al., 2024).

    loss = next-token + mtp_weight * mean over the mtp_depth extra tokens + hlp_weight * HLP."""

    mtp: Literal["none", "parallel", "sequential"] = "none"
    mtp_depth: int = 1  # extra tokens predicted beyond the next one (heads or modules)
    mtp_weight: float = 1.0
    hlp_weight: float = 0.0  # 0 = off; > 0 needs data.fim_rate > 0

    def __post_init__(self):
        _require(self.mtp in OBJECTIVE_MTP, "model.objective.mtp",
                 f"{self.mtp!r} is unknown; choose one of {', '.join(OBJECTIVE_MTP)}")
        _require(self.mtp_depth >= 1, "model.objective.mtp_depth", f"{self.mtp_depth} must be >= 1")
        _require(self.mtp_weight >= 0, "model.objective.mtp_weight", f"{self.mtp_weight} must be >= 0")
        _require(self.hlp_weight >= 0, "model.objective.hlp_weight", f"{self.hlp_weight} must be >= 0")

    @property
    def is_next_token(self) -> bool:
        """True when the loss is plain next-token cross-entropy."""
        return self.mtp == "none" and self.hlp_weight == 0


@frozen
class Model:
    """A decoder LM built from a layer pattern of mixers, each followed by a SwiGLU MLP."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (multi-head); fewer: grouped-query
    mlp_ratio: float = 8 / 3  # SwiGLU hidden width = round_up(mlp_ratio * d_model, 32)
    layer_pattern: str = "attn"  # comma-separated mixers, repeated cyclically over n_layers
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Attention = Attention()
    ssm: SSM = SSM()
    quant: Quant = Quant()
    rope: Rope = Rope()
    objective: Objective = Objective()

    def __post_init__(self):
        _require(self.vocab_size >= 2, "model.vocab_size", f"{self.vocab_size} must be >= 2")
        _require(self.d_model >= 1, "model.d_model", f"{self.d_model} must be >= 1")
        _require(self.n_layers >= 1, "model.n_layers", f"{self.n_layers} must be >= 1")
        _require(self.n_heads >= 1, "model.n_heads", f"{self.n_heads} must be >= 1")
        _require(self.d_model % self.n_heads == 0, "model.n_heads",
                 f"{self.n_heads} does not divide d_model {self.d_model}; pick a divisor of d_model")
        _require(self.head_dim % 2 == 0, "model.n_heads",
                 f"head dim d_model/n_heads = {self.head_dim} must be even for RoPE")
        kv = self.kv_heads
        _require(kv >= 1 and self.n_heads % kv == 0, "model.n_kv_heads",
                 f"{kv} does not divide n_heads {self.n_heads}; pick a divisor of n_heads")
        unknown = [m for m in self.mixers if m not in MIXERS]
        if unknown:
            raise ConfigError(f"model.layer_pattern: unknown mixer {unknown[0]!r} in "
                              f"{self.layer_pattern!r}; known: {', '.join(MIXERS)}")
        _require(self.mlp_ratio > 0, "model.mlp_ratio", f"{self.mlp_ratio} must be > 0")

    @property
    def mixers(self) -> tuple[str, ...]:
        """The mixer of each layer: the pattern repeated cyclically to n_layers."""
        pattern = tuple(p.strip() for p in self.layer_pattern.split(",") if p.strip()) or ("",)
        return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def d_ff(self) -> int:
        # A multiple of 32 so every block-scaled format (16- and 32-element blocks) tiles it.
        return int(math.ceil(self.mlp_ratio * self.d_model / 32) * 32)


@frozen
class Pose:
    """Positional skip-wise training (PoSE; Zhu et al., 2023): a window of data.seq_len tokens split
    into `chunks` whose position ids skip ahead at random to cover [0, target_length)."""

    target_length: int = 0  # 0 = off
    chunks: int = 2

    def __post_init__(self):
        _require(self.target_length >= 0, "data.pose.target_length", f"{self.target_length} must be >= 0")
        _require(self.chunks >= 1, "data.pose.chunks", f"{self.chunks} must be >= 1")


@frozen
class Data:
    """Where tokens come from and how windows are drawn (batches are a pure function of seed, step)."""

    store: str | None = None  # token store path; None builds/uses the default stdlib corpus cache
    seq_len: int = 256
    batch_size: int = 16
    heldout_fraction: float = 0.05  # fraction of documents held out for evaluation
    pack_documents: bool = True  # windows may span documents, separated by segment ids
    pose: Pose = Pose()
    fim_rate: float = 0.0  # fraction of document pieces turned into fill-in-the-middle samples

    def __post_init__(self):
        _require(self.seq_len >= 1, "data.seq_len", f"{self.seq_len} must be >= 1")
        _require(self.batch_size >= 1, "data.batch_size", f"{self.batch_size} must be >= 1")
        _require(0.0 < self.heldout_fraction < 1.0, "data.heldout_fraction",
                 f"{self.heldout_fraction} must be in (0, 1)")
        if self.pose.target_length:
            _require(self.pose.target_length >= self.seq_len, "data.pose.target_length",
                     f"{self.pose.target_length} is shorter than the window data.seq_len {self.seq_len}; set "
                     "data.pose.target_length >= data.seq_len (or 0 to turn PoSE off)")
            _require(self.pose.chunks <= self.seq_len, "data.pose.chunks",
                     f"{self.pose.chunks} chunks do not fit in data.seq_len {self.seq_len}")
        _require(0.0 <= self.fim_rate <= 1.0, "data.fim_rate", f"{self.fim_rate} must be in [0, 1]")


@frozen
class Optim:
    """AdamW with a warmup + cosine or warmup-stable-decay schedule and global-norm clipping."""

    lr: float = 3e-3
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # WSD: final fraction of steps spent decaying
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    skip_spike_factor: float | None = None  # skip a step whose loss > factor * running mean

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", f"{self.lr} must be > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"{self.warmup_steps} must be >= 0")
        _require(0.0 <= self.decay_fraction <= 1.0, "optim.decay_fraction", f"{self.decay_fraction} must be in [0, 1]")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"{self.min_lr_ratio} must be in [0, 1]")
        _require(self.clip_norm > 0, "optim.clip_norm", f"{self.clip_norm} must be > 0")


@frozen
class Train:
    """Loop length, logging, evaluation and checkpoint cadence, and the run's seed."""

    steps: int = 300
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    progress: bool = True

    def __post_init__(self):
        _require(self.steps >= 1, "train.steps", f"{self.steps} must be >= 1")
        for name in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, name)
            _require(v >= 1, f"train.{name}", f"{v} must be >= 1")


@frozen
class Mesh:
    """Device mesh axis sizes; -1 on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1

    AXES = ("data", "fsdp", "tensor", "context")

    def __post_init__(self):
        sizes = [getattr(self, a) for a in self.AXES]
        _require(all(s == -1 or s >= 1 for s in sizes), "mesh", f"axis sizes {sizes} must be >= 1 or -1")
        _require(sizes.count(-1) <= 1, "mesh", "at most one axis may be -1")

    def shape(self, n_devices: int) -> tuple[int, ...]:
        """Axis sizes for `n_devices`, filling a -1 axis; ConfigError if they do not multiply to it."""
        sizes = [getattr(self, a) for a in self.AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            _require(n_devices % known == 0, "mesh",
                     f"fixed axes {dict(zip(self.AXES, sizes))} do not divide the {n_devices} devices")
            sizes[sizes.index(-1)] = n_devices // known
        _require(math.prod(sizes) == n_devices, "mesh",
                 f"axis sizes {dict(zip(self.AXES, sizes))} multiply to {math.prod(sizes)}, "
                 f"not the {n_devices} available devices; set one axis to -1 to fill")
        return tuple(sizes)


@frozen
class Distributed:
    """Multi-process start-up (jax.distributed.initialize), one process per host or per device.

    mode "auto": initialize when these fields, HORIZON_COORDINATOR_ADDRESS / HORIZON_NUM_PROCESSES /
    HORIZON_PROCESS_ID, SLURM (srun, more than one task) or Open MPI (mpirun, more than one rank)
    describe more than one process; otherwise run as one process. "off": never initialize.
    """

    mode: Literal["auto", "off"] = "auto"
    coordinator_address: str | None = None  # host:port of process 0 (explicit launch)
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # None: every local device (one process per host)
    initialization_timeout: int = 300  # seconds to wait for all processes

    def __post_init__(self):
        if self.coordinator_address is not None:
            _require(self.num_processes is not None and self.process_id is not None, "distributed",
                     "coordinator_address needs num_processes and process_id as well")
        if self.num_processes is not None:
            _require(self.num_processes >= 1, "distributed.num_processes", f"{self.num_processes} must be >= 1")
            if self.process_id is not None:
                _require(0 <= self.process_id < self.num_processes, "distributed.process_id",
                         f"{self.process_id} must be in [0, num_processes={self.num_processes})")
        _require(self.initialization_timeout >= 1, "distributed.initialization_timeout",
                 f"{self.initialization_timeout} must be >= 1")


DECODE_CACHES = ("full", "streaming", "ema_sink", "paged")


@frozen
class Decode:
    """Cached decoding (horizon.infer): the KV cache of every attention layer, the decode-time
    selector, sampling and stopping. Streaming caches (window + sinks, StreamingLLM; EMA sinks,
    Reward Forcing) hold `cache_size` slots, `n_sinks` of them sinks; full and paged caches hold
    `cache_size` slots (None: prompt + max_new_tokens)."""

    cache: Literal["full", "streaming", "ema_sink", "paged"] = "full"
    cache_size: int | None = None  # slots per attention layer (streaming caches: n_sinks + window)
    n_sinks: int = 4
    page_size: int = 16  # paged cache: slots per page
    ema: float = 0.9  # ema_sink: S <- ema * S + (1 - ema) * evicted
    policy: str = "full"  # decode-time selector (horizon.infer.selectors) for full / paged caches
    options: str = ""  # selector arguments, "k=64,threshold=0.9"
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens holding top_p of the mass
    max_new_tokens: int = 64
    stop_tokens: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        _require(self.cache in DECODE_CACHES, "decode.cache",
                 f"{self.cache!r} is unknown; choose one of {', '.join(DECODE_CACHES)}")
        _require(self.temperature >= 0, "decode.temperature", f"{self.temperature} must be >= 0 (0 = greedy)")
        _require(0.0 < self.top_p <= 1.0, "decode.top_p", f"{self.top_p} must be in (0, 1] (1 = off)")
        _require(self.max_new_tokens >= 1, "decode.max_new_tokens", f"{self.max_new_tokens} must be >= 1")
        _require(self.n_sinks >= 0, "decode.n_sinks", f"{self.n_sinks} must be >= 0")
        _require(self.page_size >= 1, "decode.page_size", f"{self.page_size} must be >= 1")
        _require(0.0 <= self.ema < 1.0, "decode.ema", f"{self.ema} must be in [0, 1)")
        _ = self.policy_options  # validates the syntax
        if self.cache in ("streaming", "ema_sink"):
            _require(self.cache_size is not None, "decode.cache_size",
                     f"the {self.cache} cache needs a size (n_sinks + window), e.g. --cache-size 256")
            _require(self.policy == "full", "decode.policy",
                     f"{self.policy!r} selects from a full or paged cache; the {self.cache} cache is its own "
                     "policy, so use --policy full or --cache full / paged")
        if self.cache_size is not None:
            least = self.n_sinks + 1 if self.cache == "streaming" else 2 * max(self.n_sinks, 1)
            least = least if self.cache in ("streaming", "ema_sink") else 1
            _require(self.cache_size >= least, "decode.cache_size",
                     f"{self.cache_size} is too small for the {self.cache} cache with {self.n_sinks} sinks; "
                     f"use at least {least}")
        if self.cache == "ema_sink":
            _require(self.n_sinks >= 1, "decode.n_sinks", "the ema_sink cache needs at least one sink")
        for t in self.stop_tokens:
            _require(isinstance(t, int) and t >= 0, "decode.stop_tokens", f"{t!r} is not a token id (int >= 0)")

    @property
    def policy_options(self) -> dict:
        return parse_options(self.options, "decode.options")

    @property
    def window(self) -> int | None:
        """Recent-token slots of a streaming cache (cache_size - n_sinks)."""
        return None if self.cache_size is None else self.cache_size - self.n_sinks


@frozen
class Experiment:
    """Everything one run needs. `name` and `claim` describe it in `horizon list` and report.md."""

    name: str = "experiment"
    claim: str = ""
    model: Model = Model()
    data: Data = Data()
    optim: Optim = Optim()
    train: Train = Train()
    mesh: Mesh = Mesh()
    distributed: Distributed = Distributed()
    run_dir: str | None = None  # None: runs/<name>/<timestamp>; an existing run dir resumes

    def __post_init__(self):
        uses_blocks = self.model.attention.policy != "dense_causal" and "attn" in self.model.mixers
        if uses_blocks:
            _require(self.data.seq_len % self.model.attention.block == 0, "data.seq_len",
                     f"{self.data.seq_len} is not a multiple of model.attention.block "
                     f"{self.model.attention.block}; pick a multiple or a smaller block")
        if self.model.objective.hlp_weight > 0:
            _require(self.data.fim_rate > 0, "model.objective.hlp_weight",
                     "horizon-length prediction trains on fill-in-the-middle samples; set data.fim_rate > 0 "
                     "(e.g. 0.5) or model.objective.hlp_weight 0")


def to_dict(cfg) -> dict:
    """A JSON-ready dict of a (nested) config."""
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a (nested) config dataclass from `to_dict` output; unknown keys are a ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)} in saved config; "
                          "was it written by another horizon version?")
    kwargs = {}
    for name, value in data.items():
        sub = fields[name].default
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = from_dict(type(sub), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
