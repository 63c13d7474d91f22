"""`horizon aot`: compile the train step ahead of time for a mesh you do not have and print the
per-device memory it needs, so a run can be planned before hardware is booked (the idea of
MaxText's train_compile). Nothing is allocated: parameters, optimizer state and batch are
ShapeDtypeStructs carrying their shardings.

Devices: `--platform tpu --topology v5e:8x8` compiles for a TPU topology (needs libtpu);
`--platform cuda` compiles for N GPUs of the attached GPU's kind (one GPU describes the target);
`--platform cpu` (the default without an accelerator) compiles for N simulated CPU devices, in a
child process when this one has fewer, so the sharding and the argument sizes are exact while
the temporaries are the CPU compiler's estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys

from horizon.config import Data, Experiment, Mesh, Model
from horizon.errors import ConfigError

# Model presets by name (Llama-style shapes); any experiment name works too (its model).
PRESETS: dict[str, Model] = {
    "tiny": Model(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2),
    "125m": Model(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, compute_dtype="bfloat16"),
    "1b": Model(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, mlp_ratio=4.0,
                compute_dtype="bfloat16"),
    "7b": Model(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, mlp_ratio=11008 / 4096,
                tie_embeddings=False, compute_dtype="bfloat16"),
    "8b": Model(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_ratio=14336 / 4096,
                tie_embeddings=False, rope_theta=500000.0, compute_dtype="bfloat16"),
}
_CHILD = "HORIZON_AOT_CHILD"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, through the CLI's user-error path
        raise ConfigError(f"horizon aot: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="horizon aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}) or an experiment name")
    p.add_argument("--mesh", required=True, help="axis sizes, e.g. fsdp=8,tensor=8 (axes: data, fsdp, tensor, "
                                                 "context; unnamed axes are 1)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: one sequence per batch shard)")
    p.add_argument("--platform", choices=["cpu", "cuda", "tpu"], default=None,
                   help="target platform (default: this machine's)")
    p.add_argument("--topology", default=None, help="TPU topology name for --platform tpu, e.g. v5e:8x8")
    p.add_argument("--device-memory", default=None, help="per-device memory to check against, e.g. 80GiB")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    return p


def parse_mesh(text: str) -> Mesh:
    """'fsdp=8,tensor=8' -> Mesh(data=1, fsdp=8, tensor=8, context=1)."""
    sizes = dict.fromkeys(Mesh.AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--mesh: {part!r} is not AXIS=SIZE with AXIS in {', '.join(Mesh.AXES)} and SIZE >= 1")
        sizes[name] = int(value)
    return Mesh(**sizes)


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "tb": 10**12}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abgikmt")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise ConfigError(f"--device-memory: {text!r} is not a size like 80GiB or 141GB") from None


def model_for(name: str) -> Model:
    if name in PRESETS:
        return PRESETS[name]
    from horizon.cli import experiment_names, load_experiment

    if name in experiment_names():
        return load_experiment(name).CONFIG.model
    raise ConfigError(f"--model: {name!r} is neither a preset ({', '.join(PRESETS)}) nor an experiment")


def abstract_devices(platform: str, n: int, topology: str | None):
    """n devices to compile for, or None when this process cannot provide them (CPU: re-run)."""
    import jax

    if platform == "tpu":
        from jax.experimental import topologies

        if not topology:
            raise ConfigError("--platform tpu needs --topology (e.g. v5e:8x8)")
        try:
            devs = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        except Exception as e:  # noqa: BLE001 - libtpu missing or unknown topology
            raise ConfigError(f"--topology {topology}: no TPU topology ({str(e).splitlines()[0][:200]}); "
                              "install libtpu (jax[tpu])") from None
        if len(devs) != n:
            raise ConfigError(f"--mesh has {n} devices but topology {topology} has {len(devs)}")
        return list(devs)
    if platform == "cuda":
        from jax.experimental import topologies

        try:
            from jax._src.lib import xla_client

            target = xla_client.get_topology_for_devices(jax.devices("gpu")).target_config
            return list(topologies.get_topology_desc(platform="cuda", target_config=target,
                                                     topology=f"1x1x{n}").devices)
        except Exception as e:  # noqa: BLE001 - no GPU attached, or this jax lacks GPU topologies
            raise ConfigError(f"--platform cuda: cannot describe {n} GPUs here ({str(e).splitlines()[0][:200]}); "
                              "run on a machine with one GPU of the target kind, or use --platform cpu") from None
    cpus = jax.devices("cpu")
    return cpus[:n] if len(cpus) >= n else None


def compile_report(cfg: Experiment, devices) -> dict:
    """Compile the train step on `devices` (real or compile-only) and report per-device memory."""
    import jax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from horizon.train import loop, sharding
    from horizon.train.optim import learning_rate, make_optimizer
    from horizon.train.step import make_train_step

    shape = cfg.mesh.shape(len(devices))
    mesh = jax.make_mesh(shape, Mesh.AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices)
    sharding.check_fits(cfg, mesh)
    graphdef, state, state_sh, _ = loop.abstract_train_state(cfg, mesh)
    bsh = loop.batch_sharding(mesh)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    i32, f32 = jax.numpy.int32, jax.numpy.float32
    batch = {k: jax.ShapeDtypeStruct((B, T), f32 if k == "weights" else i32, sharding=bsh)
             for k in ("inputs", "targets", "positions", "segment_ids", "weights")}
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    step = make_train_step(graphdef, optimizer, cfg, learning_rate(cfg.optim, cfg.train.steps))
    with jax.set_mesh(mesh):
        lowered = jax.jit(step, in_shardings=(state_sh, bsh), out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
                          donate_argnums=0).lower(state, batch)
        compiled = lowered.compile()

    def per_device(tree):
        return sum(math.prod(sharding.shard_shape(x.shape, x.sharding.spec, mesh)) * x.dtype.itemsize
                   for x in jax.tree.leaves(tree))

    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    rep = {"platform": devices[0].platform, "device_kind": getattr(devices[0], "device_kind", "?"),
           "devices": len(devices), "mesh": dict(zip(Mesh.AXES, shape)), "batch_size": B, "seq_len": T,
           "n_params": n_params, "params_bytes": per_device(state.params),
           "opt_state_bytes": per_device(state.opt_state), "batch_bytes": per_device(batch)}
    mem = compiled.memory_analysis()
    if mem is not None:
        rep.update(argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                   alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                   code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0)))
        rep["peak_bytes"] = (rep["argument_bytes"] + rep["output_bytes"] - rep["alias_bytes"] + rep["temp_bytes"]
                             + rep["code_bytes"])
    return rep


def _gib(n) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:10.2f} {unit}"
    return f"{n:10d} B  "


def format_report(rep: dict, limit: int | None) -> str:
    lines = [f"train step compiled for {rep['devices']} x {rep['platform']} ({rep['device_kind']}), mesh "
             + ",".join(f"{k}={v}" for k, v in rep["mesh"].items())
             + f"; batch {rep['batch_size']} x {rep['seq_len']} tokens; {rep['n_params'] / 1e6:.1f}M parameters",
             "per device:",
             f"  parameters        {_gib(rep['params_bytes'])}",
             f"  optimizer state   {_gib(rep['opt_state_bytes'])}",
             f"  batch             {_gib(rep['batch_bytes'])}"]
    if "peak_bytes" in rep:
        lines += [f"  arguments         {_gib(rep['argument_bytes'])}",
                  f"  outputs (-alias)  {_gib(rep['output_bytes'] - rep['alias_bytes'])}",
                  f"  temporaries       {_gib(rep['temp_bytes'])}",
                  f"  total (peak)      {_gib(rep['peak_bytes'])}"]
        if limit:
            verdict = "fits" if rep["peak_bytes"] <= limit else "does NOT fit"
            lines.append(f"  {verdict} in {limit / 2**30:.1f} GiB ({100 * rep['peak_bytes'] / limit:.0f}%)")
    else:
        lines.append("  (this backend reports no memory analysis)")
    if rep["platform"] == "cpu":
        lines.append("note: compiled for simulated CPU devices; argument sizes are exact, temporaries are the "
                     "CPU compiler's estimate (use --platform cuda/tpu for the accelerator's)")
    return "\n".join(lines)


def run(argv: list[str]) -> dict | None:
    """Entry of `horizon aot`; returns the report (None when a child process produced it)."""
    import jax

    a = parser().parse_args(argv)
    mesh = parse_mesh(a.mesh)
    n = math.prod(getattr(mesh, ax) for ax in Mesh.AXES)
    model = model_for(a.model)
    batch = a.batch_size or mesh.data * mesh.fsdp
    if a.seq_len < 1 or batch < 1:
        raise ConfigError("--seq-len and --batch-size must be >= 1")
    cfg = Experiment(name=f"aot-{a.model}", model=model, data=Data(seq_len=a.seq_len, batch_size=batch), mesh=mesh)
    limit = parse_bytes(a.device_memory) if a.device_memory else None
    platform = a.platform or jax.default_backend()
    platform = "cuda" if platform == "gpu" else platform
    devices = abstract_devices(platform, n, a.topology)
    if devices is None:
        if os.environ.get(_CHILD):
            raise ConfigError(f"--mesh needs {n} devices; the simulated CPU set-up has {len(jax.devices('cpu'))}")
        # This process's CPU device count is fixed at start-up: compile in a child with n of them.
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
        env = {**os.environ, _CHILD: "1", "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip()}
        proc = subprocess.run([sys.executable, "-m", "horizon.train.aot", *argv, "--platform", "cpu"], env=env,
                              check=False)
        if proc.returncode:
            raise SystemExit(proc.returncode)
        return None
    rep = compile_report(cfg, devices)
    print(format_report(rep, limit))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**rep, "device_memory_bytes": limit}, f, indent=2)
    return rep


def main(argv: list[str]) -> None:
    run(argv)


if __name__ == "__main__":
    from horizon.cli import _user_errors_exit

    _user_errors_exit(lambda: main(sys.argv[1:]))


__all__ = ["PRESETS", "run", "compile_report", "parse_mesh"]
