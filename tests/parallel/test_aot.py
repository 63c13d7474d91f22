"""`horizon aot`: the train step compiled ahead of time for a mesh reports per-device sizes equal to
a hand count of the sharded parameters, optimizer state and batch; a mesh with more devices than
this process has compiles in a child with simulated devices; bad meshes are one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from horizon.cli import main as cli_main
from horizon.config import Mesh
from horizon.errors import ConfigError
from horizon.train import aot
from horizon.train.sharding import make_mesh


def _hand_count(ways: int) -> tuple[int, int]:
    """(bytes of matrices per device when every matrix splits `ways` ways, bytes of replicated vectors)
    for the `tiny` preset, from its dimensions."""
    m = aot.PRESETS["tiny"]
    M, V, F, L = m.d_model, m.vocab_size, m.d_ff, m.n_layers
    HD, GD = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    matrices = V * M + L * (2 * M * HD + 2 * M * GD + 3 * M * F)  # tied embeddings: no head
    vectors = L * 2 * M + M  # RMSNorm scales stay whole
    return 4 * matrices // ways, 4 * vectors


def test_report_counts_the_sharded_state_exactly(tmp_path):
    rep = aot.run(["--model", "tiny", "--mesh", "fsdp=2,tensor=2", "--seq-len", "64", "--json", str(tmp_path / "r.json")])
    mat, vec = _hand_count(4)
    assert rep["devices"] == 4 and rep["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2, "context": 1}
    assert rep["params_bytes"] == mat + vec
    assert 2 * (mat + vec) <= rep["opt_state_bytes"] <= 2 * (mat + vec) + 64  # Adam mu, nu + step counters
    assert rep["batch_bytes"] == 5 * 4 * (2 // 2) * 64  # 5 arrays [B=2, 64] over 2 batch shards
    # the compiled program's inputs are exactly state + batch (+ 3 scalar counters)
    assert rep["argument_bytes"] == rep["params_bytes"] + rep["opt_state_bytes"] + rep["batch_bytes"] + 12
    assert rep["peak_bytes"] >= rep["argument_bytes"]
    assert json.loads((tmp_path / "r.json").read_text())["params_bytes"] == rep["params_bytes"]


@pytest.mark.slow
def test_more_devices_than_present_compile_in_a_child(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "horizon.cli", "aot", "--model", "tiny", "--mesh", "fsdp=4,tensor=4",
                           "--seq-len", "64", "--device-memory", "1GiB", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    mat, vec = _hand_count(16)
    assert rep["devices"] == 16 and rep["params_bytes"] == mat + vec
    assert "fits in 1.0 GiB" in proc.stdout and "per device" in proc.stdout


@pytest.mark.parametrize("argv, words", [
    (["--mesh", "fsdp=2,bogus=2", "--seq-len", "64"], "bogus"),
    (["--mesh", "fsdp=2,context=3", "--seq-len", "64"], "mesh.context"),
    (["--mesh", "data=2", "--seq-len", "64", "--batch-size", "3"], "data.batch_size"),
    (["--mesh", "data=2", "--seq-len", "64", "--device-memory", "lots"], "device-memory"),
])
def test_bad_input_is_a_one_line_error(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        cli_main(["aot", "--model", "tiny", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and words in err[0], err


def test_mesh_not_matching_the_devices_is_a_config_error():
    with pytest.raises(ConfigError, match="mesh"):
        make_mesh(Mesh(data=3))  # 8 devices
