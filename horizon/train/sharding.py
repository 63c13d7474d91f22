"""The one logical-axis table and the mesh: logical names in code, physical mesh axes only here.

Parameters carry logical axis names (horizon.layers.params.param); activations are constrained
with `constrain(x, names)`. Mesh axes: data, fsdp, tensor, context.
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from horizon.config import Mesh

# logical axis -> mesh axes. The only place physical axes appear.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("ssm_inner", "tensor"),
    ("ssm_heads", "tensor"),
    ("ssm_state", None),
    ("conv", None),
    ("norm", None),
)


def make_mesh(cfg: Mesh, devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) with Auto axes; ConfigError if sizes do not fit."""
    devices = jax.devices() if devices is None else devices
    shape = cfg.shape(len(devices))
    return jax.make_mesh(shape, Mesh.AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


@contextlib.contextmanager
def rules():
    """Context in which flax resolves logical axis names with LOGICAL_RULES."""
    with nnx.logical_axis_rules(LOGICAL_RULES):
        yield


def logical_to_spec(names: tuple[str | None, ...]) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names.

    A mesh axis is used by the first dimension that asks for it: activations [batch, length,
    embed] shard the batch over (data, fsdp) and leave embed whole (fsdp shards parameters only).
    """
    table = dict(LOGICAL_RULES)
    used: set[str] = set()
    spec = []
    for n in names:
        axes = table.get(n) if n is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        free = tuple(a for a in axes if a not in used)
        used.update(free)
        spec.append(None if not free else free[0] if len(free) == 1 else free)
    return PartitionSpec(*spec)


def state_shardings(state, mesh: jax.sharding.Mesh):
    """NamedShardings for an nnx.State whose variables carry logical `out_sharding` names."""
    with rules():
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Constrain an activation's sharding by logical names when a mesh is active; no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))
