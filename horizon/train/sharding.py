"""The one logical-axis table and the mesh: logical names in code, physical mesh axes only here.

Parameters carry logical axis names (horizon.layers.params.param); activations are constrained
with `constrain(x, names)`. Mesh axes: data, fsdp, tensor, context.
"""

from __future__ import annotations

import contextlib
import math

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


def batch_shards(mesh) -> int:
    """How many ways the batch axis is split on `mesh` (the product of its `batch` mesh axes)."""
    spec = logical_to_spec(("batch",))[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def check_fits(cfg, mesh) -> None:
    """ConfigError unless the experiment's batch and sequence split evenly over `mesh`."""
    from horizon.errors import ConfigError

    b = batch_shards(mesh)
    if cfg.data.batch_size % b:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is not a multiple of the {b} batch shards "
                          f"(mesh data x fsdp); pick a multiple of {b} or change the mesh")
    c = mesh.shape.get("context", 1)
    if cfg.data.seq_len % c:
        raise ConfigError(f"mesh.context: {c} does not divide data.seq_len {cfg.data.seq_len}; pick a "
                          f"context size that divides it, or a data.seq_len that is a multiple of {c}")


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, mesh) -> tuple[int, ...]:
    """Per-device shape of an array of `shape` laid out by `spec` on `mesh` (ceil for uneven splits)."""
    out = []
    for i, n in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        ways = math.prod(mesh.shape[a] for a in axes)
        out.append(-(-n // ways))
    return tuple(out)
