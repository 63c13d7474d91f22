"""Sharding snapshots: the per-parameter and per-activation shardings of a small LM on meshes over
data, fsdp, tensor and context must equal the golden file, so a rule change shows up as a reviewed
diff. After an intended change: HORIZON_UPDATE_SNAPSHOTS=1 pytest tests/train/test_sharding_snapshot.py
rewrites tests/train/test_sharding_snapshot_golden.py."""

import os
import pathlib
import pprint

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from horizon.config import Data, Experiment, Mesh, Model
from horizon.train import loop, sharding

GOLDEN_FILE = pathlib.Path(__file__).with_name("test_sharding_snapshot_golden.py")
MESHES = {
    "data=8": Mesh(data=8),
    "fsdp=8": Mesh(data=1, fsdp=8),
    "data=2,fsdp=2,tensor=2": Mesh(data=2, fsdp=2, tensor=2),
    "fsdp=2,tensor=2,context=2": Mesh(data=1, fsdp=2, tensor=2, context=2),
}
CFG = Experiment(model=Model(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=False),
                 data=Data(seq_len=32, batch_size=8))


def _spec(spec) -> str:
    return str(tuple(spec))


def _constraints(jaxpr, out):
    """(site, shape, PartitionSpec) of every sharding constraint in a jaxpr and its sub-jaxprs, in order."""
    for e in jaxpr.eqns:
        if e.primitive.name == "sharding_constraint":
            frames = [f for f in e.source_info.traceback.frames
                      if "horizon" in f.file_name and not f.file_name.endswith("sharding.py")]
            site = f"{pathlib.Path(frames[0].file_name).name}:{frames[0].function_name}" if frames else "?"
            out.append((site, tuple(e.invars[0].aval.shape), e.params["sharding"].spec))
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _constraints(sub.jaxpr, out)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _constraints(sub, out)
    return out


def snapshot(cfg: Experiment = CFG) -> dict:
    """{mesh: {"params": {path: (spec, per-device shape)}, "batch": spec, "activations": [...]}}."""
    out = {}
    for name, mesh_cfg in MESHES.items():
        mesh = sharding.make_mesh(mesh_cfg)
        graphdef, state, _, _ = loop.abstract_train_state(cfg, mesh)
        params = {jax.tree_util.keystr(k, simple=True, separator="."): (_spec(x.sharding.spec),
                                                                         sharding.shard_shape(x.shape, x.sharding.spec, mesh))
                  for k, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
        tokens = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32)
        with jax.set_mesh(mesh):
            jaxpr = jax.make_jaxpr(lambda p, t, g=graphdef: nnx.merge(g, p)(t))(state.params, tokens)
        acts = [(site, shape, _spec(spec), sharding.shard_shape(shape, spec, mesh))
                for site, shape, spec in _constraints(jaxpr.jaxpr, [])]
        out[name] = {"params": params, "batch": _spec(loop.batch_sharding(mesh).spec), "activations": acts}
    return out


def diff(got: dict, want: dict) -> list[str]:
    """Readable differences, one line each."""
    lines = []
    for mesh in sorted(set(got) | set(want)):
        g, w = got.get(mesh, {}), want.get(mesh, {})
        for path in sorted(set(g.get("params", {})) | set(w.get("params", {}))):
            a, b = g.get("params", {}).get(path), w.get("params", {}).get(path)
            if a != b:
                lines.append(f"[{mesh}] param {path}: golden {b}, now {a}")
        if g.get("batch") != w.get("batch"):
            lines.append(f"[{mesh}] batch: golden {w.get('batch')}, now {g.get('batch')}")
        ga, wa = g.get("activations", []), w.get("activations", [])
        for i in range(max(len(ga), len(wa))):
            a = ga[i] if i < len(ga) else None
            b = wa[i] if i < len(wa) else None
            if a != b:
                lines.append(f"[{mesh}] activation #{i}: golden {b}, now {a}")
    return lines


def _golden() -> dict:
    ns: dict = {}
    exec(GOLDEN_FILE.read_text(), ns)  # noqa: S102 - our own generated literal
    return ns["GOLDEN"]


def test_shardings_match_the_golden_snapshot():
    got = snapshot()
    if os.environ.get("HORIZON_UPDATE_SNAPSHOTS"):
        GOLDEN_FILE.write_text('"""Golden shardings for test_sharding_snapshot.py (generated; review diffs)."""\n\n'
                               f"GOLDEN = {pprint.pformat(got, width=110, sort_dicts=True)}\n")
    problems = diff(got, _golden())
    assert not problems, ("shardings changed (if intended, regenerate with HORIZON_UPDATE_SNAPSHOTS=1):\n"
                          + "\n".join(problems[:40]))


def test_snapshot_fails_when_a_rule_changes(monkeypatch):
    rules = tuple((k, None if k == "mlp" else v) for k, v in sharding.LOGICAL_RULES)
    monkeypatch.setattr(sharding, "LOGICAL_RULES", rules)
    problems = diff(snapshot(), _golden())
    assert any("param layers.0.mlp.gate.kernel" in p for p in problems), problems
    assert any("SwiGLU.__call__" in p for p in problems), problems  # the constrained MLP activation
    assert not any("mixer.q.kernel" in p for p in problems)  # unrelated rules are not reported


@pytest.mark.parametrize("mesh", ["data=2,fsdp=2,tensor=2", "fsdp=2,tensor=2,context=2"])
def test_golden_agrees_with_the_rules_table(mesh):
    """The golden is not just any recording: spot-check it against LOGICAL_RULES by hand."""
    g = _golden()[mesh]
    assert g["params"]["layers.0.mlp.up.kernel"][0] == str(("fsdp", "tensor"))
    assert g["params"]["layers.0.mlp.up.kernel"][1] == (16, 48)  # [32, 96] over fsdp=2, tensor=2
    assert g["params"]["final_norm.scale"][0] == str((None,))
    assert g["activations"][0][2] == str((("data", "fsdp"), "context", None))  # embeddings [B, T, M]
    assert g["activations"][0][3] == ((2, 32, 32) if "data=2" in mesh else (4, 16, 32))  # per device
