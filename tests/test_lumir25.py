"""LUMIR25 as its participants meet it: the published layout (made from ../shared/data at test time), the
data as published (`--root`, `_0001` images, modality by rule), scoring as the leaderboard does (against
the official evaluator where it is given), and the test-phase entrypoint run as another user without
home or network."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lumir25_layout import CONFIG_NAMES, DATASET_JSON, TASK_ORDER, build_lumir25_layout, data_available


# The keys of the organisers' LUMIR25_dataset.json and evaluation configs (LUMIR25_Evalution_GC/ground-truth).
PUBLISHED_DATASET_KEYS = ["name", "release", "description", "license", "reference", "pairings", "provided_data",
                          "modality", "labels", "tensorImageSize", "tensorImageShape", "numTraining", "training",
                          "numValidation", "validation"]
PUBLISHED_CONFIG_KEYS = ["name", "evaluation_methods", "expected_shape", "eval_pairs", "eval_config_version",
                         "masked_evaluation"]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    if not data_available():
        pytest.skip("needs ../shared/data/oasis-trt20 and oasis-trt20-mm")
    return build_lumir25_layout(tmp_path_factory.mktemp("lumir25"))


@pytest.mark.benchmark_data
def test_layout_is_the_published_one(layout):
    data = json.loads(layout.dataset_json.read_text())
    assert list(data) == PUBLISHED_DATASET_KEYS
    assert layout.dataset_json.parent != layout.input_dir  # the JSON lives apart from the images
    assert data["numValidation"] == len(data["validation"]) == 30
    validation = [(e["fixed"], e["moving"]) for e in data["validation"]]
    # published order and IDs: in-domain, HighField, MultiModal, landmarks
    assert validation[0] == ("./imagesVal/LUMIRMRI_3455_0000.nii.gz", "./imagesVal/LUMIRMRI_3454_0000.nii.gz")
    assert validation[9] == ("./imagesVal/LUMIRMRI_4015_0000.nii.gz", "./imagesVal/LUMIRMRI_4014_0000.nii.gz")
    assert validation[18] == ("./imagesVal/LUMIRMRI_4024_0000.nii.gz", "./imagesVal/LUMIRMRI_4033_0001.nii.gz")
    assert validation[27] == ("./imagesVal/LUMIRMRI_3485_0000.nii.gz", "./imagesVal/LUMIRMRI_3484_0000.nii.gz")
    assert layout.field_names[18] == "disp_4024_4033.nii.gz"  # short IDs for a _0001 moving image too
    assert not (layout.input_dir / "imagesTr").exists()  # training images listed, not downloaded
    for fixed, moving in validation:
        for path in (fixed, moving):
            assert nib.load(str(layout.input_dir / path)).shape == (160, 224, 192)
    # modality 1 exactly on the MultiModal moving images
    assert [m.endswith("_0001.nii.gz") for _, m in validation] == [18 <= i < 27 for i in range(30)]
    assert all(f.endswith("_0000.nii.gz") for f, _ in validation)


@pytest.mark.benchmark_data
def test_configs_are_in_the_published_format(layout):
    assert sorted(p.name for p in layout.ground_truth.glob("LUMIR25_VAL_*.json")) == sorted(CONFIG_NAMES.values())
    assert (layout.ground_truth / DATASET_JSON).is_file()
    pairs_in_configs = []
    for task in TASK_ORDER:
        config = json.loads(layout.configs[task].read_text())
        assert list(config) == PUBLISHED_CONFIG_KEYS
        assert all(set(entry) == {"fixed", "moving"} for entry in config["eval_pairs"])  # no per-pair metric list
        metrics = [m["metric"] for m in config["evaluation_methods"]]
        assert metrics == (["ndv", "tre"] if task == "LUMIR24_Landmark" else ["ndv", "dice", "hd95"])
        for entry in config["eval_pairs"]:
            for role, word in (("fixed", "labels"), ("moving", "labels")):
                folder = "landmarks" if task == "LUMIR24_Landmark" else word
                # the official evaluator's rule: 'images' -> 'labels' / dest in the relative path
                assert (layout.ground_truth / entry[role].replace("images", folder)).is_file()
        pairs_in_configs += [(e["fixed"], e["moving"]) for e in config["eval_pairs"]]
    validation = json.loads(layout.dataset_json.read_text())["validation"]
    assert pairs_in_configs == [(e["fixed"], e["moving"]) for e in validation]


@pytest.mark.benchmark_data
def test_layout_can_be_cut_to_a_few_pairs(tmp_path):
    small = build_lumir25_layout(tmp_path, pairs_per_task=1)
    assert small.field_names == ["disp_3455_3454.nii.gz", "disp_4015_4014.nii.gz", "disp_4024_4033.nii.gz",
                                 "disp_3485_3484.nii.gz"]
    assert len(json.loads(small.configs["MultiModal_Segmentation"].read_text())["eval_pairs"]) == 1


# --------------------------------------------------------------------------------------------
# the container's entrypoint: where it builds and caches when the home is not writable
# --------------------------------------------------------------------------------------------

def test_folders_fall_back_to_scratch_without_a_writable_home(tmp_path, monkeypatch, caplog):
    from jaxreg.apps.container import prepare_folders

    home = tmp_path / "home"
    home.write_text("")  # a file: nothing can be made under it, even by root (whom modes do not stop)
    monkeypatch.setenv("HOME", str(home))
    environ = {}
    with caplog.at_level("INFO", logger="jaxreg.apps.container"):
        chosen = prepare_folders(tmp_path / "scratch", environ)
    assert chosen == {"native": tmp_path / "scratch" / "native", "cache": None}
    assert environ == {"JAXREG_NATIVE_DIR": str(tmp_path / "scratch" / "native")}
    assert len(caplog.records) == 2  # one line for each fallback


def test_folders_keep_what_is_writable(tmp_path, monkeypatch):
    from jaxreg.apps.container import prepare_folders

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    environ = {"JAXREG_NATIVE_DIR": str(tmp_path / "native")}
    chosen = prepare_folders(tmp_path / "scratch", environ)
    assert chosen == {"native": tmp_path / "native", "cache": tmp_path / "home" / ".cache" / "jaxreg" / "xla"}
    assert environ == {"JAXREG_NATIVE_DIR": str(tmp_path / "native")}
    assert prepare_folders(tmp_path / "scratch", {"JAXREG_CACHE_DIR": ""})["cache"] is None  # empty: no cache



# --------------------------------------------------------------------------------------------
# the data as published: JSON apart from the images, `_0001` moving images, modality by rule
# --------------------------------------------------------------------------------------------

def _published_style_dataset(tmp_path):
    """JSON in its own folder, images under data/imagesVal: 0002 <- 0001 (T1-like, both _0000) and
    0003 <- 0002 with the moving image in another contrast (_0001: intensities inverted in the brain)."""
    from synthetic_datasets import make_dataset

    data = tmp_path / "data"
    make_dataset(data, subjects=3)
    (data / "dataset.json").unlink()
    image = nib.load(data / "imagesVal" / "SYNTH_0002_0000.nii.gz")
    volume = np.asarray(image.dataobj, np.float32)
    other = np.where(volume > 0, 255.0 - volume, 0.0).astype(np.float32)
    nib.save(nib.Nifti1Image(other, np.eye(4)), data / "imagesVal" / "SYNTH_0002_0001.nii.gz")
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    entries = [("SYNTH_0002_0000", "SYNTH_0001_0000"), ("SYNTH_0003_0000", "SYNTH_0002_0001")]
    dataset = json_dir / "LUMIR25_dataset.json"
    dataset.write_text(json.dumps({
        "name": "synthetic", "modality": {"0": "T1w Brain MRI"},
        "training": [{"image": "./imagesTr/SYNTH_0000_0000.nii.gz"}],  # listed, absent: not needed
        "validation": [{"fixed": f"./imagesVal/{f}.nii.gz", "moving": f"./imagesVal/{m}.nii.gz"} for f, m in entries]}))
    return dataset, data


def test_pairs_carry_their_modalities_and_resolve_against_root(tmp_path):
    from jaxreg.dataset import load_pairs
    from jaxreg.errors import InputError

    dataset, data = _published_style_dataset(tmp_path)
    with pytest.raises(InputError, match="relative to"):  # by default the JSON's own folder: no images there
        load_pairs(dataset)
    pairs = load_pairs(dataset, root=data)
    assert [(p.field_name, p.fixed_modality, p.moving_modality, p.modalities_differ) for p in pairs] == [
        ("disp_0002_0001.nii.gz", "0000", "0000", False), ("disp_0003_0002.nii.gz", "0000", "0001", True)]
    assert pairs[1].moving == data / "imagesVal" / "SYNTH_0002_0001.nii.gz"


def test_contrast_plan_changes_the_config_only_across_modalities():
    from dataclasses import replace

    from jaxreg.apps.runner import contrast_plan
    from jaxreg.config import load_config
    from jaxreg.dataset import Pair

    lumir = load_config("lumir")
    assert lumir.refine.intensity_weight > 0 and lumir.fine.enabled
    across = Pair.from_paths("/d/X_4024_0000.nii.gz", "/d/X_4033_0001.nii.gz")
    config, reason = contrast_plan(across, lumir)  # lumir matches contrasts: told that they differ
    assert config == replace(lumir, contrast=replace(lumir.contrast, assume="different"))
    assert "0000 <- 0001" in reason and "mapped into the fixed contrast" in reason
    unmatched = load_config("lumir", ["contrast.match=false"])
    config, reason = contrast_plan(across, unmatched)  # without matching: MIND-SSC alone
    assert config.refine.intensity_weight == 0 and not config.fine.enabled and reason.endswith("MIND-SSC alone")
    assert config.coarse == lumir.coarse and config.unfold == lumir.unfold  # nothing else changes
    for same in (Pair.from_paths("/d/X_0002_0000.nii.gz", "/d/X_0001_0000.nii.gz"),
                 Pair(Path("/d/a.nii.gz"), Path("/d/b.nii.gz"), "a", "b")):  # no modality in the names
        assert contrast_plan(same, lumir) == (lumir, None)
    assert contrast_plan(across, load_config("lumir-multimodal"))[1] is None  # nothing to take away


def test_batch_root_and_modality_rule(tmp_path, capsys):
    from jaxreg.apps.runner import contrast_plan
    from jaxreg.config import load_config
    from jaxreg.dataset import Pair
    from jaxreg.io import load_field
    from jaxreg.registration import register
    from synthetic_datasets import run_cli, run_log

    dataset, data = _published_style_dataset(tmp_path)
    out = tmp_path / "out"
    short = ["--set", "refine.iterations=5", "--set", "fine.iterations=2", "--set", "unfold.rounds=2"]
    code, stdout, stderr = run_cli(["batch", dataset, "--root", data, "-o", out, "--preset", "lumir", *short], capsys)
    assert code == 0, stderr
    lines = {line["pair"]: line for line in run_log(out)}
    assert lines["0003_0002"]["contrast_path"] == "cross-contrast"
    assert lines["0003_0002"]["contrast_reason"] == ("modalities differ (0000 <- 0001), by rule: "
                                                     "intensity terms on the moving image mapped into the fixed contrast")
    assert lines["0003_0002"]["intensity_matched"] and "contrast_verdict" not in lines["0003_0002"]  # the rule decided
    assert lines["0002_0001"]["contrast_reason"].startswith("modality 0000 on both; brain NCC")
    assert lines["0002_0001"]["contrast_path"] == "same-contrast" and lines["0002_0001"]["intensity_used"]
    assert not lines["0002_0001"]["intensity_matched"]
    assert "cross-contrast: 1 pair, modalities differ (0000 <- 0001), by rule: intensity terms" in stdout
    assert "cross-contrast: intensities mapped (by rule)" in stderr + stdout  # the pair's progress line
    # the field is the registration of the pair told that the contrasts differ
    config = load_config("lumir", tuple(s for s in short if s != "--set"))
    expected = register(data / "imagesVal" / "SYNTH_0003_0000.nii.gz", data / "imagesVal" / "SYNTH_0002_0001.nii.gz",
                        config=contrast_plan(Pair.from_paths(data / "imagesVal" / "SYNTH_0003_0000.nii.gz",
                                                             data / "imagesVal" / "SYNTH_0002_0001.nii.gz"), config)[0]).disp
    np.testing.assert_array_equal(load_field(out / "disp_0003_0002.nii.gz"), expected)


# --------------------------------------------------------------------------------------------
# the test-phase entrypoint, run for real: another user, no writable home, no network
# --------------------------------------------------------------------------------------------

def _free_uid() -> int:
    import pwd

    for uid in range(54321, 54421):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid  # unknown to the system, as `docker run --user $(id -u):$(id -g)` often is
    pytest.skip("no free user id")


def _as_user(uid: int, argv: list[str]) -> list[str]:
    """`argv` run without network (a new network namespace) as user and group `uid`, with the
    environment `docker run --user` gives: HOME=/ (not writable), a plain PATH."""
    return ["unshare", "-n", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "env", "-i", "HOME=/", "PATH=/usr/local/bin:/usr/bin:/bin", *argv]


def _owned_by(uid: int) -> set[str]:
    """Every path on the root file system and in /dev/shm that belongs to `uid`."""
    import subprocess

    found = subprocess.run(["find", "/", "/dev/shm", "-xdev", "-uid", str(uid)], capture_output=True, text=True)
    return set(found.stdout.splitlines())


def _interpreter_for(uid: int, site_dir: str) -> str:
    """A Python of this minor version with which `uid` can import jaxreg from this environment's
    `site_dir` (the virtual environment's own interpreter may sit in root's home)."""
    import shutil
    import subprocess
    import sys

    candidates = [os.path.realpath(sys.executable), shutil.which(f"python{sys.version_info[0]}.{sys.version_info[1]}"),
                  f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    for candidate in filter(None, candidates):
        probe = f"import site; site.addsitedir({site_dir!r}); import jaxreg.apps.container"
        if subprocess.run(_as_user(uid, [candidate, "-c", probe]), capture_output=True, cwd="/").returncode == 0:
            return candidate
    pytest.skip(f"another user cannot run jaxreg here (no Python {sys.version_info[0]}.{sys.version_info[1]} "
                "it may run, or the repository and environment are not readable to it)")


@pytest.mark.slow
@pytest.mark.benchmark_data
def test_entrypoint_as_a_user_without_home_or_network(tmp_path_factory):
    import shutil
    import subprocess
    import sysconfig
    import tempfile

    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs root, unshare and setpriv to run the entrypoint as another user without network")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n is not permitted here")
    uid = _free_uid()
    site_dir = sysconfig.get_paths()["purelib"]
    python = _interpreter_for(uid, site_dir)
    root = Path(tempfile.mkdtemp(prefix="jaxreg-lumir25-entrypoint-", dir="/tmp"))  # pytest's tmp is root-only
    try:
        root.chmod(0o755)
        layout = build_lumir25_layout(root, pairs_per_task=1)
        output = root / "output"
        output.mkdir()
        os.chown(output, uid, uid)
        owned_before = _owned_by(uid)  # an earlier run's files, if that id was used before
        boot = (f"import site, sys; site.addsitedir({site_dir!r}); "
                "from jaxreg.apps.container import main; sys.exit(main(sys.argv[1:]))")
        run = subprocess.run(_as_user(uid, [python, "-c", boot, "--dataset", str(layout.dataset_json),
                                            "--input", str(layout.input_dir), "--output", str(output),
                                            "--preset", "fast"]),
                             capture_output=True, text=True, timeout=1800, cwd="/")
        assert run.returncode == 0, run.stderr[-3000:]
        assert sorted(p.name for p in output.glob("disp_*.nii.gz")) == sorted(layout.field_names)
        assert "building them in" in run.stderr  # the CPU kernels: no writable home, a temporary folder
        assert "compiled programs are not kept" in run.stderr
        assert "device: CPU" in run.stderr
        # nothing written by that user outside the output folder (its temporary folder is gone)
        strays = [path for path in _owned_by(uid) - owned_before if not path.startswith(str(output))]
        assert strays == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# scoring as the leaderboard does: the official evaluator, run from a scratch environment, as reference
# --------------------------------------------------------------------------------------------

# The organisers' evaluation.py (with its utils.py, digital_diffeomorphism.py, surface_distance/)
# and a Python with its requirements (evalutils, numpy<2, nibabel, scipy). Never a dependency of
# jaxreg: the test runs only where both are given.
OFFICIAL_EVALUATOR = os.environ.get("JAXREG_LUMIR25_EVALUATOR")
OFFICIAL_PYTHON = os.environ.get("JAXREG_LUMIR25_PYTHON", "python3")


def _folding_field(seed: int) -> np.ndarray:
    """A smooth random field of a few voxels with one sharp local swirl that folds: Dice, HD95 and
    TRE move, and NDV is not zero. (X, Y, Z, 3) float32, the LUMIR file layout."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (160, 224, 192)
    coarse = rng.standard_normal((3, 20, 28, 24)).astype(np.float32)
    disp = np.stack([ndimage.zoom(c, 8, order=1) for c in coarse]) * 1.5
    disp[0, 70:90, 100:120, 90:110] += 4.0 * np.sin(np.linspace(0, 6 * np.pi, 20))[None, :, None]
    return np.ascontiguousarray(np.moveaxis(disp, 0, -1)[: shape[0], : shape[1], : shape[2]])


def _same(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.isinf(a), np.isinf(b))
    finite = np.isfinite(a)
    np.testing.assert_allclose(a[finite], b[finite], rtol=rtol, atol=1e-12)


@pytest.mark.slow
@pytest.mark.benchmark_data
@pytest.mark.skipif(not OFFICIAL_EVALUATOR, reason="set JAXREG_LUMIR25_EVALUATOR to the organisers' evaluation.py "
                    "(and JAXREG_LUMIR25_PYTHON to a Python with its requirements) to compare with it")
def test_lumir25_scores_reproduce_the_official_evaluator(tmp_path):
    import subprocess

    from jaxreg.evaluation.lumir25 import evaluate_lumir25, lumir25_config_paths, write_lumir25_json

    layout = build_lumir25_layout(tmp_path / "lumir25", pairs_per_task=int(os.environ.get("JAXREG_LUMIR25_PAIRS", 1)))
    fields = tmp_path / "fields"
    fields.mkdir()
    for seed, name in enumerate(layout.field_names):
        nib.save(nib.Nifti1Image(_folding_field(seed), np.eye(4)), fields / name)
    configs = lumir25_config_paths(layout.ground_truth)
    official_json = tmp_path / "official.json"
    evaluator = Path(OFFICIAL_EVALUATOR)
    run = subprocess.run([OFFICIAL_PYTHON, "-u", evaluator.name, *sum(([flag, str(c)] for flag, c in
                          zip(("-l1", "-s1", "-s2", "-s3"), configs)), []),
                          "-i", f"{fields}/", "-d", f"{layout.ground_truth}/", "-o", str(official_json)],
                         cwd=evaluator.parent, capture_output=True, text=True, timeout=7200)
    assert run.returncode == 0, run.stderr[-2000:]
    official = json.loads(official_json.read_text())

    report = evaluate_lumir25(fields, configs, layout.ground_truth)
    ours = json.loads(write_lumir25_json(report, tmp_path / "ours.json").read_text())
    assert report.ok
    assert [k for k in ours if k != "jaxreg"] == list(official)
    assert ours["name"] == official["name"] and ours["eval_version"] == official["eval_version"]
    assert list(ours["cases"]) == list(official["cases"])
    assert any(case["Non-diffeomorphic Volumes"]["mean"] > 0 for case in official["cases"].values())
    for key, case in official["cases"].items():
        assert list(ours["cases"][key]) == list(case)
        for metric, value in case.items():
            _same(ours["cases"][key][metric]["detailed"], value["detailed"], rtol=1e-9)
            _same(ours["cases"][key][metric]["mean"], value["mean"], rtol=1e-9)
    assert list(ours["aggregates"]) == list(official["aggregates"])
    for name, figures in official["aggregates"].items():
        assert list(ours["aggregates"][name]) == ["mean", "std", "30"]
        for figure in ("mean", "std", "30"):
            _same(ours["aggregates"][name][figure], figures[figure], rtol=1e-9)


def test_aggregates_as_the_leaderboard_computes_them():
    from jaxreg.evaluation.lumir25 import TASKS, aggregates_of

    landmarks, in_domain, high_field, _ = TASKS
    ndv = {"Non-diffeomorphic Volumes": {"mean": 0.0, "detailed": 0.0}}
    task_cases = [
        (landmarks, {"0002_0000<--0001_0000": {**ndv, "TRE_lm": {"mean": 1.0, "detailed": 1.0}},
                     "0003_0000<--0002_0000": {**ndv, "TRE_lm": {"mean": 3.0, "detailed": 3.0}}}),
        (in_domain, {"0005_0000<--0004_0000": {**ndv, "DSC": {"mean": 0.5, "detailed": [0.5]}},
                     "0006_0000<--0005_0000": {**ndv, "DSC": {"mean": 0.7, "detailed": [0.7]}}}),
        # a pair listed by two tasks is one case, with the later task's values
        (high_field, {"0006_0000<--0005_0000": {**ndv, "DSC": {"mean": 0.9, "detailed": [0.9]}}}),
    ]
    cases, aggregates = aggregates_of(task_cases)
    assert list(cases) == ["0002_0000<--0001_0000", "0003_0000<--0002_0000", "0005_0000<--0004_0000",
                           "0006_0000<--0005_0000"]
    assert cases["0006_0000<--0005_0000"]["DSC"]["mean"] == 0.9
    assert list(aggregates) == ["DSC", "Non-diffeomorphic Volumes", "TRE_lm", "ID_dice", "OOD_dice"]
    # by hand: np.quantile interpolates linearly; TRE's robustness figure is its 70 % quantile
    assert aggregates["TRE_lm"] == pytest.approx({"mean": 2.0, "std": 1.0, "30": 2.4})
    assert aggregates["DSC"] == pytest.approx({"mean": 0.7, "std": 0.2, "30": 0.62})  # 0.5 and 0.9
    assert aggregates["ID_dice"] == pytest.approx({"mean": 0.6, "std": 0.1, "30": 0.56})  # its own cases
    assert aggregates["OOD_dice"] == pytest.approx({"mean": 0.9, "std": 0.0, "30": 0.9})
    assert aggregates["Non-diffeomorphic Volumes"] == {"mean": 0.0, "std": 0.0, "30": 0.0}


def _tiny_ground_truth(tmp_path):
    """The four configs under their published names over a small synthetic dataset, and zero fields."""
    from lumir25_layout import evaluation_config
    from synthetic import SHAPE
    from synthetic_datasets import make_dataset, save

    data = tmp_path / "data"
    make_dataset(data, subjects=4, landmarks=True)
    gt = tmp_path / "ground-truth"
    gt.mkdir()
    name = "./imagesVal/SYNTH_{:04d}_0000.nii.gz".format
    tasks = {"LUMIR24_Landmark": [(2, 1)], "LUMIR24_Segmentation": [(3, 2)], "HighField_Segmentation": [(4, 3)],
             "MultiModal_Segmentation": [(2, 3)]}
    for task, pairs in tasks.items():
        config = evaluation_config(task, [(name(f)[12:], name(m)[12:]) for f, m in pairs], [0, 1, 2])
        config["expected_shape"] = [*SHAPE, 3]
        (gt / CONFIG_NAMES[task]).write_text(json.dumps(config))
    fields = tmp_path / "fields"
    for f, m in [(2, 1), (3, 2), (4, 3), (2, 3)]:
        save(np.zeros(SHAPE + (3,), np.float32), fields / f"disp_{f:04d}_{m:04d}.nii.gz")
    return data, gt, fields


def test_evaluate_lumir25_command(tmp_path, capsys):
    from synthetic_datasets import run_cli

    data, gt, fields = _tiny_ground_truth(tmp_path)
    code, out, err = run_cli(["evaluate", data, fields, "--lumir25", gt, "-o", tmp_path / "m.json",
                              "--csv", tmp_path / "m.csv"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "m.json").read_text())
    assert list(report) == ["name", "aggregates", "cases", "eval_version", "jaxreg"]
    assert list(report["cases"]) == ["0002_0000<--0001_0000", "0003_0000<--0002_0000", "0004_0000<--0003_0000",
                                     "0002_0000<--0003_0000"]
    assert list(report["cases"]["0002_0000<--0001_0000"]) == ["Non-diffeomorphic Volumes", "TRE_lm"]
    assert len(report["cases"]["0003_0000<--0002_0000"]["DSC"]["detailed"]) == 3  # one value per label
    assert list(report["aggregates"]) == ["DSC", "HD95", "Non-diffeomorphic Volumes", "TRE_lm", "ID_dice",
                                          "OOD_dice", "MM_dice"]
    assert report["aggregates"]["MM_dice"]["mean"] == report["cases"]["0002_0000<--0003_0000"]["DSC"]["mean"]
    assert "LUMIR25 aggregates" in out and "MultiModal_Segmentation" in out
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 5

    # the same configs one by one give the same report
    configs = [a for p in sorted(gt.glob("*.json"), reverse=True) for a in ("--config", p)]
    code, _, err = run_cli(["evaluate", data, fields, *configs, "-o", tmp_path / "m2.json"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "m2.json").read_text())
    assert (again["cases"], again["aggregates"]) == (report["cases"], report["aggregates"])

    (gt / CONFIG_NAMES["HighField_Segmentation"]).unlink()
    code, _, err = run_cli(["evaluate", data, fields, "--lumir25", gt], capsys)
    assert code == 2 and "LUMIR25_VAL_HighField_Segmentation_evaluation_config.json" in err


def test_a_failed_pair_gets_a_zero_field(tmp_path):
    from jaxreg.apps.container import write_zero_fields
    from jaxreg.apps.runner import PairOutcome
    from jaxreg.dataset import Pair
    from jaxreg.io import load_field
    from synthetic import SHAPE
    from synthetic_datasets import save

    fixed = save(np.ones(SHAPE, np.float32), tmp_path / "X_0002_0000.nii.gz")
    pair = Pair.from_paths(fixed, tmp_path / "X_0001_0001.nii.gz")  # the moving image is missing
    written = write_zero_fields([PairOutcome(pair, "failed", error="moving image missing")], tmp_path / "out")
    assert written == [tmp_path / "out" / "disp_0002_0001.nii.gz"]
    assert not load_field(written[0], SHAPE).any()
