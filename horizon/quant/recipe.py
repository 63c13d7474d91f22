"""Quantization recipes: for each GEMM of a linear layer, each operand's format, block, transform
and rounding, plus rules for the layers kept in high precision. The `nvfp4` preset is the recipe of
"Pretraining Large Language Models with NVFP4" (NVIDIA, 2025), section 4; the others are baselines
and its ablations.

A linear layer Y = X W^T (W stored [N, K]) has three GEMMs, each written in the NT form
out = lhs . rhs^T that `kernels.qmatmul.qmatmul` takes:
  fprop  Y  = X  . W^T      lhs X  [M, K],  rhs W   [N, K], contraction K
  dgrad  dX = dY . W        lhs dY [M, N],  rhs W^T [K, N], contraction N
  wgrad  dW = dY^T . X      lhs dY^T [N, M], rhs X^T [K, M], contraction M (tokens)
Blocks are always laid along the contraction dim of the operand (quantize's `axis`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import warnings
from collections.abc import Sequence

import jax

from horizon.errors import ConfigError
from horizon.quant.formats import DEFAULT_BLOCK, FORMATS
from horizon.quant.rounding import ROUNDINGS


@dataclasses.dataclass(frozen=True, kw_only=True)
class OperandQuant:
    """How one GEMM operand is treated. fmt None = high precision (the operand as it comes).

    block: quantize's (rows, cols) with cols along the contraction dim; None = format default.
    hadamard: apply the 16-wide random Hadamard transform along the contraction dim first (must
      be set on both operands of a GEMM or neither, so that it cancels).
    """

    fmt: str | None = None
    block: tuple[int, int] | None = None
    rounding: str = "rne"
    hadamard: bool = False

    def __post_init__(self):
        if self.fmt is not None and self.fmt not in FORMATS:
            raise ConfigError(
                f"quant operand fmt={self.fmt!r}: choose one of {', '.join(FORMATS)} or None"
            )
        if self.rounding not in ROUNDINGS:
            raise ConfigError(
                f"quant operand rounding={self.rounding!r}: choose one of {', '.join(ROUNDINGS)}"
            )
        if self.block is not None and (len(self.block) != 2 or min(self.block) < 1):
            raise ConfigError(
                f"quant operand block={self.block}: give (rows, cols), e.g. (1, 16) or (16, 16)"
            )
        if self.fmt == "fp8" and self.block is not None:
            raise ConfigError(
                f"quant operand fmt='fp8' has one per-tensor scale; got block={self.block}, "
                "use None"
            )

    @property
    def quantized(self) -> bool:
        return self.fmt is not None

    def contraction_block(self) -> int:
        """The block length along the contraction dim (1 for high precision and fp8)."""
        if self.fmt is None or self.fmt == "fp8":
            return 1
        return (self.block or DEFAULT_BLOCK[self.fmt])[1]

    def row_block(self) -> int:
        """The block length across the contraction dim (16 for 16x16 blocks, else 1)."""
        if self.fmt is None or self.fmt == "fp8":
            return 1
        return (self.block or DEFAULT_BLOCK[self.fmt])[0]


HIGH = OperandQuant()


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmQuant:
    """The two operands of one GEMM in NT form: out = lhs . rhs^T (see the module docstring)."""

    lhs: OperandQuant = HIGH
    rhs: OperandQuant = HIGH

    def __post_init__(self):
        if self.lhs.hadamard != self.rhs.hadamard:
            raise ConfigError(
                "quant GEMM: hadamard must be set on both operands or neither "
                f"(lhs={self.lhs.hadamard}, rhs={self.rhs.hadamard}); one-sided it does not cancel"
            )

    @property
    def quantized(self) -> bool:
        return self.lhs.quantized or self.rhs.quantized


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearRecipe:
    """What `quantized_dot` does in one linear layer: fprop, dgrad, wgrad (module docstring).

    hadamard_seed: seed of the fixed random sign vector of the RHT (shared by all layers).
    implementation: passed to kernels.qmatmul.qmatmul (None = best available).
    """

    fprop: GemmQuant = GemmQuant()
    dgrad: GemmQuant = GemmQuant()
    wgrad: GemmQuant = GemmQuant()
    hadamard_seed: int = 0
    implementation: str | None = None
    interpret: bool = False  # run a Pallas implementation in interpret mode (CPU tests)

    def gemms(self) -> dict[str, GemmQuant]:
        return {"fprop": self.fprop, "dgrad": self.dgrad, "wgrad": self.wgrad}

    @property
    def stochastic(self) -> bool:
        """True when some operand uses stochastic rounding (then quantized_dot needs a key)."""
        return any(
            op.quantized and op.rounding == "stochastic"
            for g in self.gemms().values()
            for op in (g.lhs, g.rhs)
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeepRule:
    """Layers matching this rule stay in high precision. Set exactly one of:

    paths: fnmatch patterns over the module path ("blocks/3/mlp/up"); matches if any pattern does.
    layers: (start, stop), a Python slice over block indices 0..n_layers-1 (negative from the end).
    last_fraction: the last round(last_fraction * n_layers) blocks.
    """

    paths: tuple[str, ...] | None = None
    layers: tuple[int, int] | None = None
    last_fraction: float | None = None

    def __post_init__(self):
        set_ = [f for f in ("paths", "layers", "last_fraction") if getattr(self, f) is not None]
        if len(set_) != 1:
            raise ConfigError(
                f"quant KeepRule: set exactly one of paths, layers, last_fraction; got {set_}"
            )
        if self.last_fraction is not None and not 0.0 <= self.last_fraction <= 1.0:
            raise ConfigError(
                f"quant KeepRule.last_fraction={self.last_fraction} must be in [0, 1]"
            )
        if self.layers is not None and len(self.layers) != 2:
            raise ConfigError(f"quant KeepRule.layers={self.layers} must be (start, stop)")
        if isinstance(self.paths, str):
            raise ConfigError(
                f"quant KeepRule.paths={self.paths!r} must be a tuple of patterns: ({self.paths!r},)"
            )

    def describe(self) -> str:
        if self.paths is not None:
            return f"KeepRule(paths={self.paths})"
        if self.layers is not None:
            return f"KeepRule(layers={self.layers})"
        return f"KeepRule(last_fraction={self.last_fraction})"

    def layer_indices(self, n_layers: int) -> range:
        """The block indices this index rule keeps (empty for a path rule)."""
        if self.layers is not None:
            return range(n_layers)[slice(*self.layers)]
        if self.last_fraction is not None:
            n = math.floor(self.last_fraction * n_layers + 0.5)
            return range(n_layers - n, n_layers)
        return range(0)

    def matches(self, *, layer_index: int | None, n_layers: int, path: str) -> bool:
        if self.paths is not None:
            return any(fnmatch.fnmatchcase(path, p) for p in self.paths)
        return layer_index is not None and layer_index in self.layer_indices(n_layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRecipe:
    """A model-wide quantization recipe.

    linear: the treatment of every quantized linear layer; None = all in high precision.
    keep: rules for the layers kept in high precision (any rule matching keeps the layer).
    high_precision_from: fraction of training after which `high_precision_scope` runs in high
      precision (paper appendix D); None = never. scope "fprop" switches the forward GEMM only,
      "all" the whole layer. Resolved from (step, total_steps) by `resolve`.
    """

    name: str = "custom"
    linear: LinearRecipe | None = None
    keep: tuple[KeepRule, ...] = ()
    high_precision_from: float | None = None
    high_precision_scope: str = "fprop"

    def __post_init__(self):
        if self.high_precision_from is not None and not 0.0 <= self.high_precision_from <= 1.0:
            raise ConfigError(
                f"quant.high_precision_from={self.high_precision_from} must be in [0, 1] or None"
            )
        if self.high_precision_scope not in ("fprop", "all"):
            raise ConfigError(
                f"quant.high_precision_scope={self.high_precision_scope!r}: choose 'fprop' or 'all'"
            )


def resolve(
    recipe: QuantRecipe,
    *,
    layer_index: int | None,
    n_layers: int,
    path: str,
    step: int | None = None,
    total_steps: int | None = None,
) -> LinearRecipe | None:
    """The LinearRecipe for one linear layer, or None to keep it in high precision (plain dot).

    layer_index: the layer's block index in 0..n_layers-1 (None outside the blocks, e.g. heads).
    path: the module path, "/"-joined ("blocks/3/attn/q_proj"), matched by KeepRule.paths.
    step, total_steps: Python ints (the result is static: a jitted step is traced again once,
      at the switch to high precision); both or neither.
    """
    if recipe.linear is None:
        return None
    if any(r.matches(layer_index=layer_index, n_layers=n_layers, path=path) for r in recipe.keep):
        return None
    if step is not None and high_precision_active(recipe, step=step, total_steps=total_steps):
        if recipe.high_precision_scope == "all":
            return None
        return dataclasses.replace(recipe.linear, fprop=GemmQuant())
    return recipe.linear


def high_precision_active(recipe: QuantRecipe, *, step: int, total_steps: int | None) -> bool:
    """True once step >= high_precision_from * total_steps (the late-training switch)."""
    if recipe.high_precision_from is None:
        return False
    if isinstance(step, jax.core.Tracer) or isinstance(total_steps, jax.core.Tracer):
        raise ConfigError(
            "quant.resolve: step and total_steps must be Python ints (resolve outside jit)"
        )
    if total_steps is None or total_steps <= 0:
        raise ConfigError(
            f"quant.resolve: high_precision_from needs total_steps > 0, got {total_steps}"
        )
    return int(step) >= recipe.high_precision_from * int(total_steps)


def check_rules(
    recipe: QuantRecipe, layer_paths: Sequence[str], *, n_layers: int | None = None
) -> list[str]:
    """Warn (UserWarning) for each KeepRule that matches none of the model's linear layers.

    layer_paths: every quantizable linear's module path. Index rules are checked against
    n_layers (default: 1 + the largest integer path component, e.g. "blocks/11/mlp" -> 12).
    Returns the warning messages.
    """
    if n_layers is None:
        idx = [int(p) for path in layer_paths for p in re.split(r"[/.]", path) if p.isdigit()]
        n_layers = max(idx) + 1 if idx else 0
    messages = []
    for rule in recipe.keep:
        if rule.paths is not None:
            hit = any(
                rule.matches(layer_index=None, n_layers=n_layers, path=p) for p in layer_paths
            )
        else:
            hit = len(rule.layer_indices(n_layers)) > 0
        if not hit:
            msg = (
                f"quant recipe {recipe.name!r}: {rule.describe()} matches no layer "
                f"(n_layers={n_layers}, {len(layer_paths)} linear paths); it keeps nothing in BF16"
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
            messages.append(msg)
    return messages


# ---------------------------------------------------------------- presets

# Heads and embeddings: the LM head (and MTP/HLP heads) run in high precision in every preset.
HEAD_RULE = KeepRule(paths=("*embed*", "*head*"))


def _fp4_recipe(fmt: str, blk: int, *, weight_block, sr: bool, rht: bool) -> LinearRecipe:
    act = OperandQuant(fmt=fmt, block=(1, blk))
    wt = OperandQuant(fmt=fmt, block=weight_block)
    grad = OperandQuant(fmt=fmt, block=(1, blk), rounding="stochastic" if sr else "rne")
    return LinearRecipe(
        fprop=GemmQuant(lhs=act, rhs=wt),
        dgrad=GemmQuant(lhs=grad, rhs=wt),
        wgrad=GemmQuant(
            lhs=dataclasses.replace(grad, hadamard=rht), rhs=dataclasses.replace(act, hadamard=rht)
        ),
    )


def _uniform(op: OperandQuant) -> LinearRecipe:
    g = GemmQuant(lhs=op, rhs=op)
    return LinearRecipe(fprop=g, dgrad=g, wgrad=g)


# The paper keeps the first and the last blocks in BF16 (2 + 8 of 62 for the 12B model).
_PAPER_KEEP = (KeepRule(layers=(0, 1)), KeepRule(last_fraction=0.15), HEAD_RULE)
_NVFP4 = _fp4_recipe("nvfp4", 16, weight_block=(16, 16), sr=True, rht=True)

PRESETS: dict[str, QuantRecipe] = {
    "bf16": QuantRecipe(name="bf16"),
    "fp8": QuantRecipe(name="fp8", linear=_uniform(OperandQuant(fmt="fp8")), keep=(HEAD_RULE,)),
    "mxfp8": QuantRecipe(
        name="mxfp8", linear=_uniform(OperandQuant(fmt="mxfp8", block=(1, 32))), keep=(HEAD_RULE,)
    ),
    # MXFP4 with the NVFP4 recipe's treatment (RHT, SR, 2-D weights, BF16 layers), as the paper
    # compares them.
    "mxfp4": QuantRecipe(
        name="mxfp4",
        linear=_fp4_recipe("mxfp4", 32, weight_block=(32, 32), sr=True, rht=True),
        keep=_PAPER_KEEP,
    ),
    "nvfp4": QuantRecipe(name="nvfp4", linear=_NVFP4, keep=_PAPER_KEEP),
    "nvfp4_no_rht": QuantRecipe(
        name="nvfp4_no_rht",
        linear=_fp4_recipe("nvfp4", 16, weight_block=(16, 16), sr=True, rht=False),
        keep=_PAPER_KEEP,
    ),
    "nvfp4_no_sr": QuantRecipe(
        name="nvfp4_no_sr",
        linear=_fp4_recipe("nvfp4", 16, weight_block=(16, 16), sr=False, rht=True),
        keep=_PAPER_KEEP,
    ),
    "nvfp4_1d_weights": QuantRecipe(
        name="nvfp4_1d_weights",
        linear=_fp4_recipe("nvfp4", 16, weight_block=(1, 16), sr=True, rht=True),
        keep=_PAPER_KEEP,
    ),
    "nvfp4_all_layers": QuantRecipe(name="nvfp4_all_layers", linear=_NVFP4, keep=(HEAD_RULE,)),
}


def get_recipe(name: str) -> QuantRecipe:
    """The preset named `name`; ConfigError listing the presets otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown quant recipe {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
