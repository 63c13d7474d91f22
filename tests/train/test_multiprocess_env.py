"""Multi-process set-up from the launcher's environment: explicit config, HORIZON_* variables,
SLURM and Open MPI are detected with the coordinator, process count and id every process must
agree on; one-process launches stay single-process; inconsistent settings are ConfigErrors."""

import pytest

from horizon.config import Distributed
from horizon.errors import ConfigError
from horizon.train.distributed import Cluster, detect

SLURM = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "gpu[017-018,020],login3", "SLURM_STEP_NUM_NODES": "4"}
OMPI = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}


def test_slurm_one_process_per_node():
    # port: job id mod 4096 in the top 4096 ports; host: the first node of the step
    assert detect(Distributed(), SLURM) == Cluster("slurm", f"gpu017:{123456 % 4096 + 61440}", 4, 2, None)


def test_slurm_one_process_per_device_pins_the_local_device():
    env = {**SLURM, "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_STEP_NODELIST": "node7"}
    c = detect(Distributed(), env)
    assert (c.coordinator_address.split(":")[0], c.num_processes, c.local_device_ids) == ("node7", 16, (3,))


def test_open_mpi():
    job = 1531576320 // 4096
    assert detect(Distributed(), OMPI) == Cluster("openmpi", f"10.96.0.1:{job % 4096 + 61440}", 8, 5, (1,))


def test_explicit_settings_win_over_the_launcher():
    env = {**SLURM, "HORIZON_COORDINATOR_ADDRESS": "h:1", "HORIZON_NUM_PROCESSES": "2", "HORIZON_PROCESS_ID": "1"}
    assert detect(Distributed(), env) == Cluster("env", "h:1", 2, 1, None)
    cfg = Distributed(coordinator_address="c:9", num_processes=3, process_id=0, local_device_ids=(0, 1))
    assert detect(cfg, env) == Cluster("config", "c:9", 3, 0, (0, 1))
    assert detect(Distributed(mode="off"), env) is None


@pytest.mark.parametrize("env", [{}, {**SLURM, "SLURM_NTASKS": "1"}, {**OMPI, "OMPI_COMM_WORLD_SIZE": "1"}])
def test_single_process_launches_stay_single_process(env):
    assert detect(Distributed(), env) is None


@pytest.mark.parametrize("make, words", [
    (lambda: detect(Distributed(), {"HORIZON_COORDINATOR_ADDRESS": "h:1", "HORIZON_NUM_PROCESSES": "2"}),
     "HORIZON_PROCESS_ID"),
    (lambda: detect(Distributed(), {"HORIZON_COORDINATOR_ADDRESS": "h:1", "HORIZON_NUM_PROCESSES": "2",
                                    "HORIZON_PROCESS_ID": "2"}), "not in"),
    (lambda: detect(Distributed(), {**OMPI, "OMPI_MCA_orte_hnp_uri": ""}), "HORIZON_COORDINATOR_ADDRESS"),
    (lambda: detect(Distributed(), {**SLURM, "SLURM_NTASKS": "four"}), "SLURM_NTASKS"),
    (lambda: Distributed(coordinator_address="h:1"), "num_processes"),
    (lambda: Distributed(num_processes=2, process_id=2), "distributed.process_id"),
])
def test_inconsistent_settings_are_config_errors(make, words):
    with pytest.raises(ConfigError, match=words):
        make()
