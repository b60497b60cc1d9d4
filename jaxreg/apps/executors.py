"""Where a batch's pairs are registered: this process's devices, or a Ray cluster.

An executor takes the :class:`~jaxreg.apps.runner.PairTask` s that :func:`jaxreg.apps.batch.run_batch`
planned and calls ``finish(task, outcome)`` exactly once per task, in any order and from any
thread; planning, resume, the run log and scoring stay in ``run_batch``.

- :class:`LocalExecutor`: JAX devices of this process. One device and one pair in flight is a plain
  loop; otherwise one thread per slot (``threads_per_device`` per device), each device compiling its
  own program.
- :class:`RayExecutor`: one Ray task per pair. Each task reserves one GPU when the cluster has
  GPUs, else ``cpus_per_task`` CPUs (default 1, so a 2-core machine runs two pairs at once); Ray
  runs it again when its worker or node dies (``max_retries``): a task first removes the temporary
  files an earlier attempt of its pair left, then writes the field (and, when the run asks, its
  inverse) atomically, so repeating it is harmless. It writes into the run's output folder, which
  every node must see under the same path (a shared file system), as it must see the images. Ray is
  optional: ``pip install 'jaxreg[ray]'``.

Both run whatever the task carries (:class:`~jaxreg.apps.runner.PairJob`: starting field and its
convention, inverse path, invert-only), so options of the run reach every worker unchanged.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Protocol

import jax

from ..errors import ConfigError, InputError, one_line
from ..compilation import device_name
from .runner import PairOutcome, PairTask, remove_stale_temporaries

log = logging.getLogger(__name__)

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "import_ray", "send_token_when_available"]

INSTALL_HINT = "pip install 'jaxreg[ray]'"
Finish = Callable[[PairTask, PairOutcome], None]


class Executor(Protocol):
    """Runs the pairs to register. ``workers``: pairs run at once (scales the ETA); ``name``: how
    it is shown; ``devices``: what ran the pairs, for the report."""

    workers: int
    name: str
    devices: tuple[str, ...]

    def run(self, tasks: Sequence[PairTask], finish: Finish) -> None: ...


class LocalExecutor:
    """Runs the pairs on this process's JAX devices.

    Arguments:
        devices: the JAX devices to spread the pairs over (default: every local device).
        threads_per_device: pairs in flight per device (default: 4 on a GPU/TPU, whose registration
            takes a fraction of a second while reading the images and writing the field take
            seconds of CPU, so the threads overlap file work with the device's; 1 on CPU, where
            one registration already uses every core).
    """

    def __init__(self, devices: Sequence | None = None, threads_per_device: int | None = None):
        self._devices = list(devices) if devices is not None else jax.local_devices()
        if not self._devices:
            raise ConfigError("no JAX device to run the pairs on.")
        if threads_per_device is None:
            threads_per_device = 1 if all(d.platform == "cpu" for d in self._devices) else 4
        if threads_per_device < 1:
            raise ConfigError(f"threads_per_device must be >= 1, got {threads_per_device}")
        self._slots = [d for d in self._devices for _ in range(threads_per_device)]
        self.workers = len(self._slots)
        self.devices = tuple(device_name(d) for d in self._devices)
        self.name = f"{len(self._devices)} device(s)"

    def run(self, tasks: Sequence[PairTask], finish: Finish) -> None:
        """Run every task here; with several devices each pair is compiled for and placed on its slot's device."""
        several = len(self._devices) > 1
        if len(self._slots) == 1:
            for task in tasks:
                finish(task, task.run())
            return
        work: queue.Queue = queue.Queue()
        for task in tasks:
            work.put(task)

        def worker(device) -> None:
            while True:
                try:
                    task = work.get_nowait()
                except queue.Empty:
                    return
                finish(task, task.run(device if several else None))

        with ThreadPoolExecutor(max_workers=len(self._slots), thread_name_prefix="jaxreg-batch") as pool:
            for future in [pool.submit(worker, d) for d in self._slots]:
                future.result()


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------

def import_ray():
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _run_task(task: PairTask) -> PairOutcome:
    """The Ray task: one pair, in a worker process (which imported jaxreg when it unpickled this)."""
    remove_stale_temporaries(task.job.output.parent, [task.pair])  # an earlier, killed attempt
    outcome = task.run()
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
    """Runs :class:`~jaxreg.apps.runner.PairTask` s as Ray tasks (see the module docstring).

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
                raise InputError(f"cannot start or reach the Ray cluster {where}: {one_line(err)}") from None
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
        self.devices = (self.name,)
        log.info("connected to %s", self.name)

    def run(self, tasks: Sequence[PairTask], finish: Finish) -> None:
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
                        outcome = PairOutcome(task.pair, "failed", error=f"Ray: {type(err).__name__}: {one_line(err)}")
                    finish(task, outcome)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            for task in tasks:  # temporaries of a last attempt that was killed
                remove_stale_temporaries(task.job.output.parent, [task.pair])

    def close(self) -> None:
        """Disconnect from the cluster (and stop the local instance this executor started)."""
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
            self._owned = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
