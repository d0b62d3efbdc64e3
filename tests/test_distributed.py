"""Rank / world / local rank / master address from torchrun's and SLURM's variables."""

from __future__ import annotations

import pytest

from maescale.distributed import detect_env, expand_nodelist


@pytest.mark.parametrize("nodelist, hosts", [
    ("node001", ["node001"]),
    ("node[001-003,007]", ["node001", "node002", "node003", "node007"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("a[1-2],b3,c[05-06]", ["a1", "a2", "b3", "c05", "c06"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "n[3-1]", ""])
def test_expand_nodelist_rejects_garbage(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_slurm_env_multi_node():
    env = detect_env({
        "SLURM_PROCID": "13", "SLURM_NTASKS": "32", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "node[001-003,007]", "SLURM_NTASKS_PER_NODE": "8",
    })
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (13, 32, 5, 8)
    assert env.master_addr == "node001" and env.num_nodes == 4 and env.source == "slurm"
    assert 1024 < env.master_port < 32768
    same_job = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "32", "SLURM_JOB_ID": "123456",
                           "SLURM_JOB_NODELIST": "node[001-003,007]", "SLURM_TASKS_PER_NODE": "8(x4)"})
    assert same_job.master_port == env.master_port and same_job.local_world_size == 8


def test_slurm_env_without_tasks_per_node_derives_it():
    env = detect_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "n[1-2]"})
    assert env.local_world_size == 2 and env.master_addr == "n1"


def test_torchrun_env_wins():
    env = detect_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                      "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "x"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == \
        (1, 2, 1, "10.0.0.1", 1234, "torchrun")


def test_single_process():
    env = detect_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_job_ports_never_fall_in_the_ephemeral_range():
    """Linux hands out 32768-60999 to outgoing connections (net.ipv4.ip_local_port_range): a
    rendezvous port there can already be taken on the first node. Every job id maps below it."""
    from maescale.distributed import port_for_job

    ports = {port_for_job(str(j)) for j in range(0, 200_000, 7)}
    assert min(ports) >= 10_000 and max(ports) < 32_768
    assert len(ports) > 15_000  # spread: two jobs on one first node rarely collide
    assert port_for_job("123456") == port_for_job("123456")


def test_socket_interface_reaches_nccl_and_gloo_unless_the_site_set_it():
    from maescale.distributed import set_socket_ifname

    env: dict[str, str] = {}
    set_socket_ifname("ib0", env)
    assert env == {"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0"}
    site = {"NCCL_SOCKET_IFNAME": "eth2"}
    set_socket_ifname("ib0", site)
    assert site == {"NCCL_SOCKET_IFNAME": "eth2", "GLOO_SOCKET_IFNAME": "ib0"}
    untouched: dict[str, str] = {}
    set_socket_ifname(None, untouched)
    assert untouched == {}


def test_a_second_engine_in_the_same_process_starts_after_shutdown(tmp_path):
    """shutdown() also drops DeepSpeed's cached groups (a clone of the world group): without it
    the next engine in this process fails at start-up on a group of the destroyed backend."""
    from maescale.config import load_config
    from maescale.distributed import init_distributed, shutdown
    from maescale.models import build_model
    from maescale.optim import build_engine

    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "deepspeed.lean_step=false"])
    for _ in range(2):
        ctx = init_distributed("cpu")
        try:
            engine = build_engine(cfg, build_model(cfg.model, device=ctx.device), 1, ctx.device).engine
            engine.destroy()
        finally:
            shutdown()
