"""Time the reference PyTorch ConvexAdam (PyPI ``convexadam``) on a pair, in another Python.

The reference is never a dependency of jaxreg: the user points `jaxreg benchmark --reference` at an
interpreter that has ``torch`` and ``convexadam`` installed (e.g. a separate virtual environment),
and it runs there in a child process with the LUMIR organisers' settings (those of the
``convexadam-lumir`` preset, :func:`jaxreg.config.convexadam_settings`). What comes back is its
time (registration only, not imports or file reading), its peak memory and its device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import convexadam_settings, load_config
from ..errors import InputError

_SCRIPT = r"""
import json, resource, sys, time
import nibabel as nib, numpy as np, torch
from convexAdam.convex_adam_MIND import convex_adam_pt
fixed_path, moving_path, settings, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
if threads > 0:
    torch.set_num_threads(threads)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
fixed = np.asarray(nib.load(fixed_path).dataobj, np.float32)
moving = np.asarray(nib.load(moving_path).dataobj, np.float32)
times = []
for _ in range(int(sys.argv[5])):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    disp = convex_adam_pt(fixed, moving, device=device, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
device_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
print("JAXREG_REFERENCE " + json.dumps(dict(seconds=times, peak_memory_gb=peak, device_peak_gb=device_peak,
      device=str(device), torch=torch.__version__, field_shape=list(np.shape(disp)))))
"""


@dataclass
class ReferenceTiming:
    """The reference ConvexAdam's figures on one pair."""

    seconds: list
    peak_memory_gb: float
    device: str
    torch: str
    device_peak_gb: float | None = None


def time_reference(python: str | os.PathLike, fixed_path, moving_path, *, repeats: int = 1,
                   threads: int = 0, timeout: float = 3600) -> ReferenceTiming:
    """Run the reference ConvexAdam `repeats` times on the pair with interpreter `python`.

    `threads` > 0 sets torch's CPU threads (0: torch's default, all cores). Raises InputError with
    one line when the interpreter is missing or lacks torch / convexadam.
    """
    python = shutil.which(str(python)) or str(python)
    if not Path(python).exists():
        raise InputError(f"reference interpreter '{python}' not found: give the python of an environment "
                         "with `pip install convexadam torch`.")
    settings = convexadam_settings(load_config("convexadam-lumir"))
    command = [str(python), "-c", _SCRIPT, str(fixed_path), str(moving_path), json.dumps(settings),
               str(threads), str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("JAXREG_REFERENCE "):
            figures = json.loads(line.split(" ", 1)[1])
            return ReferenceTiming(seconds=figures["seconds"], peak_memory_gb=figures["peak_memory_gb"],
                                   device=figures["device"], torch=figures["torch"],
                                   device_peak_gb=figures["device_peak_gb"])
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise InputError(f"the reference ConvexAdam did not run with '{python}': {last} "
                     "(it needs `pip install convexadam torch` in that environment).")
