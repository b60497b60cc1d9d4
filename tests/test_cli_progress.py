"""Progress reaches a user's terminal while a command runs, not only when it ends."""

import os
import pty
import re
import select
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from synthetic import brain, pull, smooth_field
from synthetic_datasets import ENTRY, FAST


def _read_until_exit(master: int, proc: subprocess.Popen, marker: bytes, timeout: float = 300.0):
    """Everything the process writes to its terminal, and whether it was still running when
    `marker` first appeared."""
    seen, alive_at_marker = b"", None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if alive_at_marker is None and marker in seen:
                alive_at_marker = proc.poll() is None
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    return seen.decode("utf-8", errors="replace"), alive_at_marker


@pytest.mark.slow
def test_register_shows_its_steps_on_a_terminal_while_it_runs(tmp_path):
    fixed = brain()
    for name, data in [("fixed", fixed), ("moving", pull(fixed, smooth_field(amplitude=2.0)))]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    master, slave = pty.openpty()
    # no compilation cache: the program compiles in this run, so the run lasts long enough to watch
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", JAXREG_CACHE_DIR="")
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, "register", str(tmp_path / "fixed.nii.gz"),
                             str(tmp_path / "moving.nii.gz"), "-o", str(tmp_path / "disp.nii.gz"), *FAST],
                            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=tmp_path)
    os.close(slave)
    try:
        text, alive = _read_until_exit(master, proc, b"compiling")
    finally:
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # colours and cursor moves
    assert proc.returncode == 0, text
    assert alive, f"no progress before the end:\n{text}"
    assert "✓ compiling" in text and "✓ registering" in text  # each finished step stays, with its time
    assert text.index("compiling") < text.index("wrote disp")
