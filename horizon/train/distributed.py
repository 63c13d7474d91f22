"""Multi-process runs on JAX's SPMD runtime: jax.distributed.initialize from the config or the
launcher's environment (explicit coordinator, SLURM srun, Open MPI mpirun), and the small helpers
that keep every process on the same control flow while only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax
import numpy as np

from horizon.config import Distributed
from horizon.errors import ConfigError

# Ports in the ephemeral range, derived from the job id so every process of a job agrees
# (the convention of JAX's own SLURM / Open MPI cluster detection).
_PORT_BASE = 65535 - 2**12 + 1


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process sits: what jax.distributed.initialize is called with."""

    source: str  # "config", "env", "slurm", "openmpi"
    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'n1', 'n1,n2', 'n[001-004,7],m2' -> 'n1' / 'n001'."""
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not m:
        raise ConfigError(f"distributed: cannot read the SLURM node list {nodelist!r}; set "
                          "--distributed.coordinator-address host:port")
    return m.group(1) + (m.group(2) or "")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise ConfigError(f"distributed: environment variable {name}={env.get(name)!r} is not an integer") from None


def _tasks_per_node(env: Mapping[str, str]) -> int:
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    return max(1, _int(env, "SLURM_NTASKS") // max(1, int(nodes)))


def detect(cfg: Distributed, env: Mapping[str, str] | None = None) -> Cluster | None:
    """The multi-process set-up `cfg` and the environment describe, or None for one process.

    Precedence: explicit config fields, HORIZON_* variables, SLURM, Open MPI. A launcher that
    starts one process (srun -n 1) means a single-process run.
    """
    env = os.environ if env is None else env
    if cfg.mode == "off":
        return None
    local = cfg.local_device_ids
    if cfg.coordinator_address is not None:
        return Cluster("config", cfg.coordinator_address, cfg.num_processes, cfg.process_id, local)
    addr = env.get("HORIZON_COORDINATOR_ADDRESS")
    if addr:
        for name in ("HORIZON_NUM_PROCESSES", "HORIZON_PROCESS_ID"):
            if name not in env:
                raise ConfigError(f"distributed: HORIZON_COORDINATOR_ADDRESS is set but {name} is not; "
                                  "set all three (or none)")
        n, pid = _int(env, "HORIZON_NUM_PROCESSES"), _int(env, "HORIZON_PROCESS_ID")
        if not 0 <= pid < n:
            raise ConfigError(f"distributed: HORIZON_PROCESS_ID={pid} is not in [0, HORIZON_NUM_PROCESSES={n})")
        return Cluster("env", addr, n, pid, local)
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        n = _int(env, "SLURM_NTASKS")
        if n > 1:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodes:
                raise ConfigError("distributed: SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST; "
                                  "launch with srun or set --distributed.coordinator-address")
            port = env.get("JAX_COORDINATOR_PORT") or str(_int(env, "SLURM_JOB_ID") % 2**12 + _PORT_BASE)
            if local is None and _tasks_per_node(env) > 1 and "SLURM_LOCALID" in env:
                local = (_int(env, "SLURM_LOCALID"),)  # one process per device
            return Cluster("slurm", f"{_first_slurm_host(nodes)}:{port}", n, _int(env, "SLURM_PROCID"), local)
    if "OMPI_COMM_WORLD_SIZE" in env and "OMPI_COMM_WORLD_RANK" in env:
        n = _int(env, "OMPI_COMM_WORLD_SIZE")
        if n > 1:
            uri = env.get("OMPI_MCA_orte_hnp_uri", "")
            m = re.search(r"tcp://([^,:/]+)", uri)
            if not m:
                raise ConfigError("distributed: Open MPI run without OMPI_MCA_orte_hnp_uri (Open MPI >= 5); set "
                                  "HORIZON_COORDINATOR_ADDRESS=host:port of rank 0")
            job = int(uri.split(".", 1)[0]) // 2**12 if uri.split(".", 1)[0].isdigit() else 0
            port = env.get("JAX_COORDINATOR_PORT") or str(job % 2**12 + _PORT_BASE)
            local_size = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))
            if local is None and local_size > 1 and "OMPI_COMM_WORLD_LOCAL_RANK" in env:
                local = (_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),)
            return Cluster("openmpi", f"{m.group(1)}:{port}", n, _int(env, "OMPI_COMM_WORLD_RANK"), local)
    return None


def initialize(cfg: Distributed, env: Mapping[str, str] | None = None, *, log=print) -> Cluster | None:
    """Start jax.distributed when `detect` finds more than one process (idempotent); None otherwise.

    Must run before anything touches a JAX device; ConfigError when that already happened."""
    cluster = detect(cfg, env)
    if cluster is None or cluster.num_processes == 1:
        return None
    if jax.distributed.is_initialized():
        return cluster
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address, num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids is not None else None,
            initialization_timeout=cfg.initialization_timeout)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:300]
        raise ConfigError(f"distributed: jax.distributed.initialize failed ({first}); it must run before any "
                          "JAX computation, and every process must reach the coordinator "
                          f"{cluster.coordinator_address}") from None
    if cluster.process_id == 0:
        log(f"distributed: {cluster.num_processes} processes via {cluster.source}, coordinator "
            f"{cluster.coordinator_address}, {jax.device_count()} devices")
    return cluster


def is_primary() -> bool:
    """True on the process that writes metrics, configs and reports (process 0)."""
    return jax.process_index() == 0


def host_value(x) -> np.ndarray:
    """A replicated (or fully addressable) array's value on this host, on any process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any one (e.g. a SIGTERM seen by one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([int(flag)], np.int32))).any())


def put_batch(batch: Mapping[str, np.ndarray], sharding) -> dict:
    """Host batch (the same global numpy arrays on every process) -> global arrays on `sharding`.

    Every process builds the whole batch (a pure function of seed and step); each device takes
    its own slice, so no process needs another's data."""
    if jax.process_count() == 1:
        import jax.numpy as jnp

        return jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), np.shape(v))
            for k, v in batch.items()}
