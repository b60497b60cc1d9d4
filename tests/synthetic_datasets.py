"""Small LUMIR-layout datasets on disk and the CLI runner shared by the batch, Ray and evaluation tests.

``make_dataset`` writes ``imagesVal/``, ``labelsVal/`` (and, when asked, ``landmarksVal/`` with
landmark volumes and their CSVs) and a ``dataset.json`` whose pairs are ``i+1 <- i``; no
``evaluation_config.json``, so the default evaluation rule applies.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from jaxreg.apps.batch import RUN_LOG
from jaxreg.cli.main import main

from synthetic import brain, pull, smooth_field

# a short refinement: the same program as test_cli / test_pipeline, compiled once per session
FAST = ["--preset", "convexadam-lumir", "--set", "refine.iterations=30"]
# runs `jaxreg ARGS` in a new Python process
ENTRY = "import sys; from jaxreg.cli.main import main; sys.exit(main(sys.argv[1:]))"


def save(data, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def labels_of(image):
    return (image > 100).astype(np.uint8) + (image > 180)


def _landmarks(image, subject):
    """Four single-voxel landmarks at bright voxels of the image (ids 1..4), and their CSV rows."""
    inside = np.argwhere(image > 150)
    rng = np.random.default_rng(100 + subject)
    points = inside[rng.choice(len(inside), 4, replace=False)]
    volume = np.zeros(image.shape, np.uint8)
    rows = ["id,name,x,y,z"]
    for k, p in enumerate(points, start=1):
        volume[tuple(p)] = k
        rows.append(f"{k},L{k},{p[0]},{p[1]},{p[2]}")
    return volume, "\n".join(rows) + "\n"


def make_dataset(root, subjects=5, landmarks=False):
    """SYNTH_0001..N, each a smooth deformation of one brain, with label maps (and landmark volumes
    with CSVs when `landmarks`); pairs (i+1 <- i). Returns the dataset JSON's path."""
    base = brain()
    for i in range(1, subjects + 1):
        image = pull(base, smooth_field(amplitude=2.0, seed=10 + i))
        name = f"SYNTH_{i:04d}_0000"
        save(image, root / "imagesVal" / f"{name}.nii.gz")
        save(labels_of(image), root / "labelsVal" / f"{name}.nii.gz")
        if landmarks:
            volume, rows = _landmarks(image, i)
            save(volume, root / "landmarksVal" / f"{name}.nii.gz")
            (root / "landmarksVal" / f"{name}.csv").write_text(rows)
    validation = [{"fixed": f"./imagesVal/SYNTH_{i + 1:04d}_0000.nii.gz", "moving": f"./imagesVal/SYNTH_{i:04d}_0000.nii.gz"}
                  for i in range(1, subjects)]
    (root / "dataset.json").write_text(json.dumps({"name": "synthetic", "validation": validation}))
    return root / "dataset.json"


def run_cli(args, capsys):
    """`jaxreg ARGS` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_log(out_dir):
    """The run log's lines, parsed."""
    return [json.loads(line) for line in (out_dir / RUN_LOG).read_text().splitlines()]
