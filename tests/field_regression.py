"""Check that a refactoring kept every registration result bit for bit.

Registers the embedded demo pair and the first two OASIS-TRT-20 benchmark pairs with every preset
that the code at a reference commit ships, once with that commit's code ("before") and once with the
working tree's ("after"), and compares the displacement fields voxel by voxel::

    .venv/bin/python tests/field_regression.py --before 37f80f0
    .venv/bin/python tests/field_regression.py --before main --presets fast,lumir --cases demo

The reference commit is built in a temporary folder (``git archive`` + ``pip install --no-deps
--target``) or taken ready-built from ``--before-site``. Its fields are cached under
``--cache/<commit sha>/`` and computed once; the working tree's fields are recomputed on every run
(into ``--cache/after/``). Each side runs in one fresh subprocess of this interpreter that calls only
``jaxreg.register(fixed, moving, preset=name)``, with ``XLA_FLAGS`` removed so that each version
configures XLA itself.

Exit status 0 when every field is identical or within 1e-5 voxels of the reference, 1 otherwise.
A script, not a pytest module: a full run takes several minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OASIS_DATASET = REPO.parent / "shared" / "data" / "oasis-trt20" / "dataset.json"
# case name prefix -> dataset: oasis-N is the N-th OASIS-TRT-20 pair, mm-N the same pair across contrasts
DATASETS = {"oasis-": OASIS_DATASET, "mm-": REPO.parent / "shared" / "data" / "oasis-trt20-mm" / "dataset.json"}
DEMO_FIXED = "jaxreg/demo/MNIDEMO_0001_0000.nii.gz"  # ICBM152 2009a template
DEMO_MOVING = "jaxreg/demo/MNIDEMO_0000_0000.nii.gz"  # Colin27
PRESET_FOLDERS = ("configs", "jaxreg/configs")
DEFAULT_CASES = ("demo", "oasis-1", "oasis-2")
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "jaxreg-field-regression"
TOLERANCE = 1e-5  # voxels

# Runs inside each side's subprocess: argv[1] is a JSON list of jobs {preset, case, fixed, moving,
# out}, argv[2] the folder that jaxreg must be imported from.
WORKER = r"""
import json, sys, time, traceback
from pathlib import Path

import numpy as np
import jaxreg

jobs_file, expected_root = sys.argv[1], Path(sys.argv[2]).resolve()
origin = Path(jaxreg.__file__).resolve()
if not origin.is_relative_to(expected_root):
    sys.exit(f"jaxreg was imported from {origin}, not from {expected_root}")
print(f"  jaxreg imported from {origin.parent}", flush=True)
failed = 0
for job in json.loads(Path(jobs_file).read_text()):
    start = time.perf_counter()
    try:
        disp = np.asarray(jaxreg.register(job["fixed"], job["moving"], preset=job["preset"]).disp)
    except Exception:
        failed += 1
        print(f"  {job['preset']:<18} {job['case']:<9} FAILED", flush=True)
        traceback.print_exc()
        continue
    partial = Path(job["out"] + ".partial.npy")
    np.save(partial, disp)
    partial.replace(job["out"])
    print(f"  {job['preset']:<18} {job['case']:<9} {time.perf_counter() - start:6.1f} s", flush=True)
sys.exit(1 if failed else 0)
"""


def git(*args: str, binary: bool = False):
    out = subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout
    return out if binary else out.decode().strip()


def shipped_presets(sha: str) -> list[str]:
    """Preset names of the commit: the ``*.toml`` files of its configs folder."""
    for folder in PRESET_FOLDERS:
        files = git("ls-tree", "--name-only", sha, f"{folder}/").splitlines()
        names = sorted(Path(name).stem for name in files if name.endswith(".toml"))
        if names:
            return names
    sys.exit(f"no presets found in {' or '.join(PRESET_FOLDERS)} at {sha[:12]}")


def resolve_cases(names: list[str], sha: str, inputs: Path) -> dict[str, tuple[Path, Path]]:
    """(fixed, moving) paths per case name; the demo pair is taken from the reference commit."""
    cases = {}
    skipped = []
    for name in names:
        if name == "demo":
            inputs.mkdir(parents=True, exist_ok=True)
            for member in (DEMO_FIXED, DEMO_MOVING):
                path = inputs / Path(member).name
                if not path.exists():
                    path.write_bytes(git("show", f"{sha}:{member}", binary=True))
            cases[name] = (inputs / Path(DEMO_FIXED).name, inputs / Path(DEMO_MOVING).name)
        elif (prefix := name.rpartition("-")[0] + "-") in DATASETS and name[len(prefix):].isdigit() \
                and int(name[len(prefix):]) >= 1:
            dataset = DATASETS[prefix]
            if not dataset.is_file():
                skipped.append(f"{name} ({dataset} not found)")
                continue
            pairs = json.loads(dataset.read_text())["validation"]
            index = int(name[len(prefix):]) - 1
            if index >= len(pairs):
                sys.exit(f"{name}: {dataset} lists only {len(pairs)} validation pairs")
            cases[name] = tuple((dataset.parent / pairs[index][key]).resolve() for key in ("fixed", "moving"))
        else:
            sys.exit(f"unknown case {name!r}: expected demo, oasis-N or mm-N (N >= 1)")
    if skipped:
        print(f"skipping {', '.join(skipped)}")
    return cases


def environment() -> dict[str, str]:
    """Versions that the fields depend on besides the jaxreg code."""
    versions = {"python": platform.python_version(), "machine": platform.machine()}
    for package in ("jax", "jaxlib", "numpy"):
        versions[package] = metadata.version(package)
    return versions


def prepare_before_cache(folder: Path) -> None:
    """Empty the cache when it was made with other versions of jax, jaxlib, numpy or Python."""
    manifest = folder / "environment.json"
    current = environment()
    if manifest.is_file() and json.loads(manifest.read_text()) != current:
        print(f"the cache in {folder} was made with {manifest.read_text().strip()}: recomputing")
        for field in folder.glob("*.npy"):
            field.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(current))


def build(sha: str, workdir: Path) -> Path:
    """Install the commit's package into workdir/site and return that folder."""
    src, site = workdir / "src", workdir / "site"
    src.mkdir()
    print(f"building {sha[:12]} in {workdir}")
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait():
        sys.exit(f"git archive {sha} failed")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(src)],
                   check=True)
    return site


def run_side(label: str, jobs: list[dict], *, cwd: Path, import_root: Path, pythonpath: Path | None = None) -> bool:
    """Register all jobs in one subprocess; True when it finished without errors."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(jobs, handle)
    print(f"{label}: {len(jobs)} registrations")
    start = time.perf_counter()
    try:
        code = subprocess.run([sys.executable, "-c", WORKER, handle.name, str(import_root)], cwd=cwd, env=env).returncode
    finally:
        os.unlink(handle.name)
    print(f"{label}: {time.perf_counter() - start:.1f} s wall" + ("" if code == 0 else f", exit status {code}"))
    return code == 0


def compare(before_file: Path, after_file: Path) -> tuple[str, str, str, bool]:
    """(max |diff|, differing voxels, verdict, passed) for one pair of saved fields."""
    if not before_file.is_file() or not after_file.is_file():
        side = "before" if not before_file.is_file() else "after"
        return "-", "-", f"MISSING ({side} failed)", False
    before, after = np.load(before_file), np.load(after_file)
    if before.shape != after.shape or before.dtype != after.dtype:
        return "-", "-", f"DIFFERENT ({before.dtype}{before.shape} vs {after.dtype}{after.shape})", False
    differing = np.any(before != after, axis=0) if before.ndim == 4 else before != after
    voxels = f"{int(differing.sum())} / {differing.size}"
    if np.array_equal(before, after):
        return "0", voxels, "identical", True
    largest = float(np.max(np.abs(before.astype(np.float64) - after.astype(np.float64))))  # NaN if any is NaN
    if not largest <= TOLERANCE:
        return f"{largest:.3g}", voxels, "DIFFERENT", False
    return f"{largest:.3g}", voxels, f"within {TOLERANCE:g}", True


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git ref of the reference code (e.g. the commit before a refactoring)")
    parser.add_argument("--before-site", type=Path, help="a ready `pip install --target` folder of --before (skips the build)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"folder of the saved fields (default {DEFAULT_CACHE})")
    parser.add_argument("--presets", help="comma-separated presets (default: all that --before ships)")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated cases: demo, oasis-N, mm-N (default %(default)s)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    try:
        sha = git("rev-parse", "--verify", f"{args.before}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"--before {args.before!r} is not a commit of {REPO}")
    presets = shipped_presets(sha)
    if args.presets:
        chosen = [name.strip() for name in args.presets.split(",") if name.strip()]
        unknown = sorted(set(chosen) - set(presets))
        if unknown:
            sys.exit(f"{', '.join(unknown)}: not shipped at {sha[:12]} (it ships {', '.join(presets)})")
        presets = chosen
    before_dir, after_dir = args.cache / sha, args.cache / "after"
    cases = resolve_cases([name.strip() for name in args.cases.split(",") if name.strip()], sha, before_dir / "inputs")
    if not cases:
        sys.exit("no cases to run")
    print(f"before {args.before} = {sha[:12]}, after = working tree of {REPO}")
    print(f"presets {', '.join(presets)}; cases {', '.join(cases)}")

    def jobs(folder: Path) -> list[dict]:
        return [{"preset": preset, "case": case, "fixed": str(fixed), "moving": str(moving),
                 "out": str(folder / f"{case}__{preset}.npy")}
                for preset in presets for case, (fixed, moving) in cases.items()]

    prepare_before_cache(before_dir)
    missing = [job for job in jobs(before_dir) if not Path(job["out"]).is_file()]
    if not missing:
        print(f"before: all {len(presets) * len(cases)} fields cached in {before_dir}")
    elif args.before_site:
        with tempfile.TemporaryDirectory() as empty:
            run_side("before", missing, cwd=Path(empty), import_root=args.before_site, pythonpath=args.before_site.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="jaxreg-before-") as workdir:
            site = build(sha, Path(workdir))
            empty = Path(workdir) / "run"
            empty.mkdir()
            run_side("before", missing, cwd=empty, import_root=site, pythonpath=site)

    after_dir.mkdir(parents=True, exist_ok=True)
    after_jobs = jobs(after_dir)
    for job in after_jobs:
        Path(job["out"]).unlink(missing_ok=True)
    run_side("after", after_jobs, cwd=REPO, import_root=REPO)

    rows = []
    for preset in presets:
        for case in cases:
            name = f"{case}__{preset}.npy"
            rows.append((case, preset, *compare(before_dir / name, after_dir / name)))
    header = ("case", "preset", "max |diff| (vox)", "differing voxels", "result")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())

    verdicts = [row[4] for row in rows]
    identical = verdicts.count("identical")
    within = sum(verdict.startswith("within") for verdict in verdicts)
    failed = len(rows) - identical - within
    if failed:
        print(f"FAIL: {failed} of {len(rows)} fields differ from {sha[:12]} by more than {TOLERANCE:g} voxels or are missing")
    elif within:
        print(f"PASS: {identical} of {len(rows)} fields bit-identical to {sha[:12]}, {within} within {TOLERANCE:g} voxels (not bit-identical)")
    else:
        print(f"PASS: all {len(rows)} fields bit-identical to {sha[:12]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
