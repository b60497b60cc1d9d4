"""`jaxreg batch --ray`: a real Ray cluster (head + two worker nodes on this machine) writes the same fields as a local
run, survives a worker killed mid-pair (Ray retries the pair), and a second run resumes."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxreg.apps import batch

from synthetic_datasets import FAST, make_dataset, run_cli, run_log as _log

TASK_TITLE = "ray::_run_task"  # the process title Ray gives a worker while it runs jaxreg.apps.executors._run_task


def _run(args, capsys):
    return run_cli(["batch", *args], capsys)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head without CPUs and two one-CPU worker nodes on this machine, all shut down afterwards.
    (Nodes keep Ray's default node IP: a head bound to 127.0.0.1 is not reachable by ``ray.init``
    in Ray 2.60, which rewrites loopback addresses to the machine's IP.)"""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'jaxreg[ray]'")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _descends_from_us(pid: int) -> bool:
    """True if `pid` is a descendant of this test process (a worker of the cluster it started)."""
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid == os.getpid():
            return True
    return False


def _running_task_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(TASK_TITLE) and _descends_from_us(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def _kill_first_running_task(killed: list, stop: threading.Event) -> None:
    """Wait until a worker runs a pair, then SIGKILL that worker (once)."""
    while not stop.is_set():
        for pid in _running_task_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray workers through /proc")
def test_ray_cluster_matches_local_survives_a_killed_worker_and_resumes(ray_cluster, tmp_path, capsys):
    dataset = make_dataset(tmp_path / "data", subjects=7)  # 6 pairs
    local, out = tmp_path / "local", tmp_path / "ray"
    code, _, stderr = _run([dataset, "-o", local, *FAST, "--evaluate"], capsys)
    assert code == 0, stderr
    names = sorted(p.name for p in local.glob("disp_*.nii.gz"))
    assert len(names) == 6

    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_first_running_task, args=(killed, stop), daemon=True)
    killer.start()
    try:
        code, stdout, stderr = _run([dataset, "-o", out, *FAST, "--evaluate", "--ray-address", ray_cluster.address],
                                    capsys)
    finally:
        stop.set()
        killer.join()
    assert code == 0, stderr
    assert killed, "no running Ray task was seen to kill"
    assert not Path(f"/proc/{killed[0]}").exists() or b"zombie" in Path(f"/proc/{killed[0]}/status").read_bytes()
    assert "2 x 1 CPU" in stderr and "3 nodes" in stderr

    # every field written once, equal to the local run's; no temporary file left
    assert sorted(p.name for p in out.glob("disp_*.nii.gz")) == names
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    for name in names:
        np.testing.assert_allclose(np.asarray(nib.load(out / name).dataobj),
                                   np.asarray(nib.load(local / name).dataobj), atol=1e-4)
    ray_lines, local_lines = _log(out), {line["field"]: line for line in _log(local)}
    assert sorted(line["field"] for line in ray_lines) == names and {line["status"] for line in ray_lines} == {"ok"}
    for line in ray_lines:
        assert line["metrics"]["dice"] == pytest.approx(local_lines[line["field"]]["metrics"]["dice"], abs=1e-3)
    progress = [line for line in stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 6 and all(" ok " in line for line in progress) and "ETA" in progress[0]
    assert json.loads((out / batch.RUN_CONFIG).read_text())["config"] == json.loads(
        (local / batch.RUN_CONFIG).read_text())["config"]
    assert json.loads((out / batch.EVALUATION_JSON).read_text())["pairs_scored"] == 6

    # a second run skips every pair and rewrites nothing
    stamps = {name: (out / name).stat().st_mtime_ns for name in names}
    code, stdout, _ = _run([dataset, "-o", out, *FAST, "--ray-address", ray_cluster.address], capsys)
    assert code == 0 and "6 skipped" in stdout
    assert [line["status"] for line in _log(out)[6:]] == ["skipped"] * 6
    assert stamps == {name: (out / name).stat().st_mtime_ns for name in names}


def test_ray_missing_is_one_error_line(tmp_path, capsys, monkeypatch):
    dataset = make_dataset(tmp_path / "data", subjects=2)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, _, stderr = _run([dataset, "-o", tmp_path / "out", *FAST, "--ray"], capsys)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "pip install 'jaxreg[ray]'" in stderr


def test_an_explicit_address_sends_the_token_when_one_exists(tmp_path, monkeypatch):
    """Ray 2.60: `ray start` protects a cluster with a token; a driver given HOST:PORT must be told
    to send it (RAY_AUTH_MODE=token), or it retries InvalidAuthToken until it gives up."""
    from jaxreg.apps.executors import send_token_when_available

    token = tmp_path / "auth_token"
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # set, then delete: monkeypatch restores either state
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    send_token_when_available("10.0.0.1:6379")
    assert "RAY_AUTH_MODE" not in os.environ  # no token anywhere: nothing to send
    token.write_text("secret")
    for address in (None, "auto"):  # ray.init finds the token itself
        send_token_when_available(address)
        assert "RAY_AUTH_MODE" not in os.environ
    send_token_when_available("10.0.0.1:6379")
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's choice stands
    send_token_when_available("10.0.0.1:6379")
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
