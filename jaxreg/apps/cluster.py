"""Batch runs on a Ray cluster: one Ray task per pair; planning, resume and logging stay local.

:class:`RayExecutor` plugs into :func:`jaxreg.apps.batch.run_batch` (``executor=``), which plans the
run, skips finished fields, writes ``run_log.jsonl`` / ``run_config.json`` and scores exactly as in
a local run; only "register this pair" (:class:`jaxreg.apps.batch.PairTask`, the local per-pair code
path) runs on the cluster. Each task

* reserves one GPU when the cluster has GPUs, else ``cpus_per_task`` CPUs (default 1, so a
  2-core machine runs two pairs at once);
* is run again by Ray when its worker or node dies (``max_retries``): a task first removes the
  temporary files an earlier attempt of its pair left, then writes the field atomically
  (temporary file, then rename), so repeating it is harmless;
* writes into the run's output folder, which every node must see under the same path (a shared
  file system), as it must see the images.

Workers import :mod:`jaxreg` (this module) before any JAX computation, so its XLA settings apply.
Ray is optional: ``pip install 'jaxreg[ray]'``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace

from .batch import PairOutcome, PairTask, _one_line, _remove_stale_temporaries
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

__all__ = ["RayExecutor", "import_ray"]

INSTALL_HINT = "pip install 'jaxreg[ray]'"


def import_ray():
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _run_task(task: PairTask) -> PairOutcome:
    """The Ray task: one pair, in a worker process (which imported jaxreg when it unpickled this)."""
    _remove_stale_temporaries(task.job.output.parent, [task.pair])  # an earlier, killed attempt
    outcome = task()
    return replace(outcome, device=f"{socket.gethostname()}/{outcome.device}")


def send_token_when_available(address: str | None) -> None:
    """Let a driver given an explicit ``HOST:PORT`` authenticate to a token-protected cluster.

    Since Ray 2.5x, ``ray start`` turns token authentication on by default (token in
    ``~/.ray/auth_token``). With ``address="auto"`` or none, ``ray.init`` finds the token itself;
    with ``HOST:PORT`` it sends it only under ``RAY_AUTH_MODE=token``, and otherwise retries
    "InvalidAuthToken" until it gives up (found running the README's Slurm recipe). A token sent
    to a cluster without authentication is ignored (checked with Ray 2.60), so token mode is turned
    on whenever a token exists and the user has not chosen a mode. Ray reads the mode when it is
    imported, so this must run first.
    """
    if not address or address == "auto" or "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


class RayExecutor:
    """Runs :class:`~jaxreg.apps.batch.PairTask` s as Ray tasks (see the module docstring).

    Arguments:
        address: the cluster to connect to (``HOST:PORT`` of its head, ``auto``); None does what
            ``ray.init()`` does: ``$RAY_ADDRESS`` or a cluster started on this machine with
            ``ray start``, else a new local Ray instance.
        cpus_per_task: CPUs reserved per pair on a cluster without GPUs.
        max_retries: how often Ray runs a pair again after its worker died.

    Use as a context manager (or call :meth:`close`): it disconnects, and stops a local instance
    it started.
    """

    def __init__(self, address: str | None = None, *, cpus_per_task: int = 1, max_retries: int = 3):
        if cpus_per_task < 1:
            raise ConfigError(f"CPUs per Ray task must be at least 1, got {cpus_per_task}.")
        send_token_when_available(address)  # before `import ray`, which reads RAY_AUTH_MODE
        self._ray = ray = import_ray()
        self._owned = not ray.is_initialized()
        if self._owned:
            try:
                ray.init(address=address or None, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = f"at '{address}'" if address else "(local)"
                raise InputError(f"cannot start or reach the Ray cluster {where}: {_one_line(err)}") from None
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if gpus:
            self.options = {"num_gpus": 1, "num_cpus": 1}
            self.workers, unit = gpus, "1 GPU"
        else:
            self.options = {"num_cpus": cpus_per_task}
            self.workers, unit = max(cpus // cpus_per_task, 1), f"{cpus_per_task} CPU"
            if cpus < cpus_per_task:
                raise ConfigError(f"the Ray cluster has {cpus} CPUs and no GPU: a pair needs {cpus_per_task} CPUs.")
        self.options["max_retries"] = max_retries
        nodes = sum(node.get("Alive", False) for node in ray.nodes())
        self.name = f"ray ({nodes} node{'s' if nodes != 1 else ''}, {self.workers} x {unit})"
        log.info("connected to %s", self.name)

    def run(self, tasks: Sequence[PairTask], finish: Callable[[PairTask, PairOutcome], None]) -> None:
        """Submit every task at once; call ``finish`` as each one ends (a task Ray gave up on,
        e.g. after ``max_retries`` worker deaths, is a ``failed`` outcome). Ctrl-C cancels the rest."""
        if not tasks:
            return
        ray = self._ray
        remote = ray.remote(**self.options)(_run_task)
        submitted = {remote.remote(task): task for task in tasks}
        pending = list(submitted)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    task = submitted[ref]
                    try:
                        outcome = ray.get(ref)
                    except Exception as err:  # noqa: BLE001  worker or node lost for good, task cancelled
                        outcome = PairOutcome(task.pair, "failed", error=f"Ray: {type(err).__name__}: {_one_line(err)}")
                    finish(task, outcome)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            for task in tasks:  # temporaries of a last attempt that was killed
                _remove_stale_temporaries(task.job.output.parent, [task.pair])

    def close(self) -> None:
        """Disconnect from the cluster (and stop the local instance this executor started)."""
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
            self._owned = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
