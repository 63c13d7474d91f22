"""Which quantization treatment each linear layer of a model gets: the module paths recipes match
("layers/3/attn/q", "layers/2/ssm/in") and the LinearRecipe (or None) resolved for one of them from
the model config. Lives in horizon.quant so that every mixer (attention and MLP in horizon.models,
Mamba-2 in horizon.ssm) resolves its recipe the same way without importing horizon.models.
"""

from __future__ import annotations

import dataclasses

from horizon.config import Model
from horizon.quant.recipe import LinearRecipe, get_recipe, resolve

ATTN_LINEARS = ("q", "k", "v", "o")
MLP_LINEARS = ("gate", "up", "down")
# Mamba-2 (Dao & Gu, 2024): "in" is the fused input projection to z, x, B, C; "out" the output
# projection. The dt projection (one column per head) stays high precision: see horizon.ssm.ssd.
SSM_LINEARS = ("in", "out")

# Stochastic-rounding keys are fold_in(step_key, gemm_id); each block owns ids 16 i .. 16 i + 15.
GEMM_IDS_PER_LAYER = 16
ATTN_GEMM_OFFSET, SSM_GEMM_OFFSET, MLP_GEMM_OFFSET = 0, 4, 8


def gemm_id(layer_index: int, offset: int) -> int:
    """The stochastic-rounding id of the GEMM at `offset` in block `layer_index` (distinct per layer)."""
    assert 0 <= offset < GEMM_IDS_PER_LAYER
    return layer_index * GEMM_IDS_PER_LAYER + offset


def linear_paths(cfg: Model) -> list[str]:
    """The module path of every quantizable linear layer ("layers/3/attn/q"), as recipes match them."""
    paths = []
    for i, mixer in enumerate(cfg.mixers):
        if mixer == "attn":
            paths += [f"layers/{i}/attn/{n}" for n in ATTN_LINEARS]
        elif mixer == "ssd":
            paths += [f"layers/{i}/ssm/{n}" for n in SSM_LINEARS]
        paths += [f"layers/{i}/mlp/{n}" for n in MLP_LINEARS]
    return paths


def linear_recipe(cfg: Model, *, layer_index: int, path: str) -> LinearRecipe | None:
    """The quantization treatment of the linear layer at `path` ("layers/3/attn/q") in block
    `layer_index`: a horizon.quant LinearRecipe, or None for high precision.

    With `quant.high_precision_from` set, the model is built twice (horizon.train.loop): with the
    configured fraction (early phase) and with 0.0 (the late, high-precision phase, NVFP4 paper
    app. D), so the recipe is resolved at a fixed (step 0 of 1).
    """
    if cfg.quant.recipe == "bf16":
        return None
    recipe = get_recipe(cfg.quant.recipe)
    if cfg.quant.high_precision_from is None:
        return resolve(recipe, layer_index=layer_index, n_layers=cfg.n_layers, path=path)
    recipe = dataclasses.replace(recipe, high_precision_from=cfg.quant.high_precision_from,
                                 high_precision_scope=cfg.quant.high_precision_scope)
    return resolve(recipe, layer_index=layer_index, n_layers=cfg.n_layers, path=path, step=0, total_steps=1)
