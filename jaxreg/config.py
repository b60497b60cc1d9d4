"""Configuration: one frozen dataclass per stage, presets in TOML, overrides as ``stage.key=value``.

Configs are frozen and hashable, so a whole :class:`RegistrationConfig` is a static argument of the
jitted pipeline: same config + same shapes = one compiled program. The preset ``name`` takes no part
in equality or hashing, so two configs that differ only by name share one compiled program.

ConvexAdam's abbreviations are spelt out here; :data:`CONVEXADAM_NAMES` maps them, for readers of the
reference code and for :func:`convexadam_settings`, which turns a config into the reference's
arguments (the settings the LUMIR organisers used live in ``configs/convexadam-lumir.toml`` alone).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from .errors import ConfigError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_adam_level(stage: str, level) -> None:
    """The settings an Adam level (``refine``, ``fine``) shares: steps, rate, regularisation weights."""
    _check(level.iterations >= 0, f"{stage}.iterations must be >= 0, got {level.iterations}")
    _check(level.learning_rate > 0, f"{stage}.learning_rate must be > 0, got {level.learning_rate}")
    _check(level.diffusion_weight >= 0, f"{stage}.diffusion_weight must be >= 0, got {level.diffusion_weight}")
    _check(level.smoothing_passes >= 0, f"{stage}.smoothing_passes must be >= 0, got {level.smoothing_passes}")
    _check(level.fold_weight >= 0, f"{stage}.fold_weight must be >= 0, got {level.fold_weight}")
    _check(0 <= level.fold_margin < 1, f"{stage}.fold_margin must be in [0, 1), got {level.fold_margin}")


@dataclass(frozen=True, kw_only=True)
class AffineConfig:
    """12-DOF affine initialisation by gradient descent on a coarse image pyramid.

    ``levels`` are downsampling factors (coarse to fine), ``iterations`` the Adam steps per level.
    The affine is parameterised around the image centre so that an identity start is neutral.
    """

    enabled: bool = False
    levels: tuple[int, ...] = (4, 2)
    iterations: tuple[int, ...] = (60, 30)
    learning_rate: float = 0.01
    smoothing_sigma: float = 1.0

    def __post_init__(self):
        _check(len(self.levels) == len(self.iterations),
               f"affine.levels and affine.iterations must have the same length, got {self.levels} and {self.iterations}")
        _check(all(int(lv) >= 1 for lv in self.levels), f"affine.levels must be >= 1, got {self.levels}")
        _check(all(int(it) >= 0 for it in self.iterations), f"affine.iterations must be >= 0, got {self.iterations}")
        _check(self.learning_rate > 0, f"affine.learning_rate must be > 0, got {self.learning_rate}")


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """MIND-SSC descriptor (Heinrich et al. 2013): patch radius and neighbour dilation in voxels."""

    radius: int = 1
    dilation: int = 2

    def __post_init__(self):
        _check(self.radius >= 1, f"features.radius must be >= 1, got {self.radius}")
        _check(self.dilation >= 1, f"features.dilation must be >= 1, got {self.dilation}")


@dataclass(frozen=True, kw_only=True)
class CoarseConfig:
    """ConvexAdam's discrete stage: cost volume on a coarse grid, coupled convex rounds, inverse consistency.

    ``grid_spacing``: voxels per coarse cell; ``search_radius``: half-width of the displacement
    window in coarse cells; ``coupling_weights``: one coupled round per weight, after one uncoupled
    argmin. Each round picks per cell the displacement minimising ``cost + w * |d - smooth|^2``, smooth
    being the box-filtered field of the round before, so the weights must be finite and >= 0, and
    must not decrease: the rounds anneal, each pulling harder towards a smooth field (a smaller weight
    after a larger one would undo the smoothing already won). Each weight is one round unrolled in the
    compiled program.
    """

    enabled: bool = True
    grid_spacing: int = 2
    search_radius: int = 2
    coupling_weights: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    inverse_consistent: bool = True
    inverse_iterations: int = 15

    def __post_init__(self):
        _check(self.grid_spacing >= 1, f"coarse.grid_spacing must be >= 1, got {self.grid_spacing}")
        _check(self.search_radius >= 1, f"coarse.search_radius must be >= 1, got {self.search_radius}")
        weights = self.coupling_weights
        _check(len(weights) > 0, "coarse.coupling_weights must list at least one weight, e.g. [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]")
        _check(all(math.isfinite(w) and w >= 0 for w in weights),
               f"coarse.coupling_weights must be finite and >= 0, got {list(weights)}")
        _check(all(a <= b for a, b in zip(weights, weights[1:])),
               f"coarse.coupling_weights must not decrease (each round pulls harder towards a smooth field), got {list(weights)}")
        _check(self.inverse_iterations >= 0, f"coarse.inverse_iterations must be >= 0, got {self.inverse_iterations}")


@dataclass(frozen=True, kw_only=True)
class ContrastConfig:
    """What the program does when fixed and moving may differ in contrast. The intensity terms
    (``refine.intensity_weight``'s channel and the ``fine`` level) assume one contrast; MIND-SSC,
    which the coarse search and the feature level match, does not.

    The guard runs after the coarse search, inside the fixed brain (``fixed > 0``). The contrasts agree
    when the NCC of fixed and moved is at least ``min_ncc`` and mapping the moved intensities into the
    fixed contrast (the mean fixed intensity per moved intensity, :func:`jaxreg.ops.intensity.intensity_table`)
    raises that NCC by less than ``max_match_gain``. A linear intensity change gains nothing; another
    contrast of the same tissues, which no linear map explains, gains much. ``min_ncc = -1`` and
    ``max_match_gain = 2`` (the defaults) mean no guard. A preset without intensity terms has nothing
    to guard. ``assume = "different"`` skips the judgement: something outside the images (LUMIR25's
    file names, the user) says the contrasts differ.

    Where they differ, ``match = true`` keeps the intensity terms on the moving image mapped into the
    fixed contrast through that table; false drops them, leaving MIND-SSC alone. The table is keyed
    by the moved intensity (``match_bins`` entries over [0, 1]) and, for ``match_context`` > 1, by
    its local mean over a ``match_context``^3 box, which tells partial volumes from a tissue of the
    same intensity (1: the intensity alone). On such a mapped image the full-resolution level runs
    ``fine_step_scale`` times ``fine.iterations`` Adam steps with ``fine_intensity_scale`` times
    ``fine.intensity_weight`` (:attr:`RegistrationConfig.fine_when_mapped`): the mapped intensities are
    a noisier match than a same-contrast image, so the local NCC should weigh more, and longer; and
    ``fine_half_resolution_scale`` times ``fine.half_resolution_iterations`` steps at half resolution.
    """

    min_ncc: float = -1.0
    max_match_gain: float = 2.0
    match: bool = False
    match_bins: int = 32
    match_context: int = 5
    assume: str = "auto"
    fine_step_scale: float = 1.0
    fine_intensity_scale: float = 1.0
    fine_half_resolution_scale: float = 1.0

    def __post_init__(self):
        _check(-1 <= self.min_ncc <= 1, f"contrast.min_ncc must be in [-1, 1], got {self.min_ncc}")
        _check(0 < self.max_match_gain <= 2, f"contrast.max_match_gain must be in (0, 2], got {self.max_match_gain}")
        _check(self.match_bins >= 3, f"contrast.match_bins must be >= 3, got {self.match_bins}")
        _check(self.match_context >= 1 and self.match_context % 2 == 1,
               f"contrast.match_context must be an odd box width >= 1, got {self.match_context}")
        _check(self.assume in ("auto", "different"),
               f"contrast.assume must be 'auto' (the guard judges) or 'different', got {self.assume!r}")
        _check(self.fine_step_scale >= 0, f"contrast.fine_step_scale must be >= 0, got {self.fine_step_scale}")
        _check(self.fine_intensity_scale >= 0,
               f"contrast.fine_intensity_scale must be >= 0, got {self.fine_intensity_scale}")
        _check(self.fine_half_resolution_scale >= 0,
               f"contrast.fine_half_resolution_scale must be >= 0, got {self.fine_half_resolution_scale}")

    @property
    def judges(self) -> bool:
        """Whether the images can be found to differ: a threshold is set, or the contrasts are said to."""
        return self.assume == "different" or self.min_ncc > -1 or self.max_match_gain < 2


@dataclass(frozen=True, kw_only=True)
class RefineConfig:
    """Adam refinement (optax) of a displacement grid with box smoothing and diffusion regularisation.

    The optimised grid has ``grid_spacing`` voxels per cell; the displacement used in the loss is the
    grid smoothed by ``smoothing_passes`` zero-padded 3^3 box filters (ConvexAdam: 3); the loss is
    ``sum_channels mean_voxels (F_m(x+u) - F_f)^2 + diffusion_weight * sum_axes mean(grad u)^2``.

    ``intensity_weight`` > 0 adds the [0, 1]-normalised image, average-pooled to the refinement grid
    and multiplied by this weight, as a 13th feature channel: an intensity SSD term next to MIND, for
    same-contrast pairs such as T1w to T1w (0 = ConvexAdam's MIND-only data term). The ``contrast``
    section guards it.

    ``fold_weight`` > 0 adds ``fold_weight * mean(relu(fold_margin - det(I + grad u))^2)`` on the
    refinement grid: a penalty on (nearly) folding cells that lets a weaker diffusion weight stay
    fold-free (the margin keeps cells away from det = 0, where trilinear upsampling can fold).

    ``symmetric = true`` also refines the backward field (moving to fixed, from the inverse of the
    starting field) and returns the mean of the forward field and the inverse of the backward one:
    neither image is the reference, which removes the bias of one direction (landmark error).
    """

    enabled: bool = True
    symmetric: bool = False
    grid_spacing: int = 2
    iterations: int = 80
    learning_rate: float = 1.0
    diffusion_weight: float = 1.6
    smoothing_passes: int = 3
    intensity_weight: float = 0.0
    fold_weight: float = 0.0
    fold_margin: float = 0.1

    def __post_init__(self):
        _check(self.grid_spacing >= 1, f"refine.grid_spacing must be >= 1, got {self.grid_spacing}")
        _check(self.intensity_weight >= 0, f"refine.intensity_weight must be >= 0, got {self.intensity_weight}")
        _check_adam_level("refine", self)


@dataclass(frozen=True, kw_only=True)
class FineConfig:
    """Full-resolution refinement on image intensities, after the feature refinement (same-contrast pairs).

    The feature refinement works on a grid of ``refine.grid_spacing`` voxels; this level adds a
    residual on the full voxel grid that aligns what that grid cannot resolve (cortical folds). With
    ``r`` the residual smoothed by smoothing_passes 3^3 box filters and ``u`` = field so far + ``r``,
    the loss is ``mean_voxels (intensity_weight * (M(x+u) - F))^2 + ncc_weight * (1 - mean_voxels
    LNCC^2) + diffusion_weight * sum_axes mean(grad r)^2 + fold_weight * mean(relu(fold_margin -
    det(I + grad u))^2)`` on [0, 1]-normalised images, LNCC being the local normalised cross-correlation
    over ``ncc_window``^3 boxes (robust to local intensity differences, which the SSD is not). The
    diffusion penalty acts on the residual only, so the level adds detail without relaxing the field
    it starts from. Both intensity terms assume one contrast: the ``contrast`` section guards the level
    as it guards the intensity channel.

    With ``half_resolution_iterations`` > 0 the same loss first takes that many Adam steps on both
    images average-pooled by 2 (a residual on the 2-voxel grid, the LNCC boxes twice as wide in
    millimetres): it aligns what lies between the feature level's smoothed cells and single voxels, at
    an eighth of a full-resolution step's cost.
    """

    enabled: bool = False
    half_resolution_iterations: int = 0
    iterations: int = 30
    learning_rate: float = 0.5
    intensity_weight: float = 6.0
    diffusion_weight: float = 0.8
    smoothing_passes: int = 1
    fold_weight: float = 10.0
    fold_margin: float = 0.3
    ncc_weight: float = 0.0
    ncc_window: int = 5

    def __post_init__(self):
        _check(self.intensity_weight >= 0, f"fine.intensity_weight must be >= 0, got {self.intensity_weight}")
        _check(self.ncc_weight >= 0, f"fine.ncc_weight must be >= 0, got {self.ncc_weight}")
        _check(self.intensity_weight > 0 or self.ncc_weight > 0,
               "fine needs a similarity term: set fine.intensity_weight or fine.ncc_weight > 0")
        _check(self.ncc_window >= 3 and self.ncc_window % 2 == 1,
               f"fine.ncc_window must be odd and >= 3, got {self.ncc_window}")
        _check(self.half_resolution_iterations >= 0,
               f"fine.half_resolution_iterations must be >= 0, got {self.half_resolution_iterations}")
        _check_adam_level("fine", self)


@dataclass(frozen=True, kw_only=True)
class UnfoldConfig:
    """Fold repair of the final field (:mod:`jaxreg.stages.unfold`): at most ``rounds`` rounds of local 3^3
    smoothing wherever one of LUMIR's ten digital Jacobians is negative. ``rounds = 0`` turns it off
    (ConvexAdam has no such step).

    The first ``local_rounds`` rounds (at most ``rounds``) touch only the folding voxels; the later
    ones grow the fold mask by a ``grow``^3 box first. Each round moves the field ``blend`` of the way
    to its local mean (1 = replace it). Small, local steps undo less of the registration than wide
    ones: on OASIS they keep most of the Dice that a repair by full 3^3 replacement costs.
    """

    rounds: int = 0
    local_rounds: int = 0
    grow: int = 3
    blend: float = 1.0

    def __post_init__(self):
        _check(self.rounds >= 0, f"unfold.rounds must be >= 0, got {self.rounds}")
        _check(self.local_rounds >= 0, f"unfold.local_rounds must be >= 0, got {self.local_rounds}")
        _check(self.grow >= 1 and self.grow % 2 == 1, f"unfold.grow must be an odd number >= 1, got {self.grow}")
        _check(0 < self.blend <= 1, f"unfold.blend must be in (0, 1], got {self.blend}")


@dataclass(frozen=True, kw_only=True)
class SymmetricConfig:
    """The whole registration both ways (``enabled``): the program registers moving to fixed as well,
    takes the mean of the forward field and the backward field's inverse, so that neither image is
    the reference, repairs its folds, and refits it to the fixed image with the full-resolution level
    (``[fine]``) and the fold repair (``[unfold]``). About twice the time of the one-way program."""

    enabled: bool = False


@dataclass(frozen=True, kw_only=True)
class RegistrationConfig:
    """Everything that defines one registration program. ``name`` is informative only: it is left
    out of equality and hashing, so it never splits the compile cache."""

    name: str = field(default="custom", compare=False)
    affine: AffineConfig = field(default_factory=AffineConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    fine: FineConfig = field(default_factory=FineConfig)
    unfold: UnfoldConfig = field(default_factory=UnfoldConfig)
    symmetric: SymmetricConfig = field(default_factory=SymmetricConfig)

    def __post_init__(self):
        if self.symmetric.enabled:
            _check(not self.affine.enabled, "symmetric.enabled needs affine.enabled = false: the two "
                   "directions are averaged on the voxel grid (align the images first, e.g. jaxreg prepare)")
            _check(self.fine.enabled and self.fine.iterations > 0, "symmetric.enabled needs the full-resolution "
                   "level (fine.enabled = true, fine.iterations > 0), which refits the averaged field")
        _check(self.fine.ncc_weight > 0 or self.contrast.fine_intensity_scale > 0 or not self.fine.enabled,
               "contrast.fine_intensity_scale = 0 leaves the full-resolution level no similarity term on "
               "cross-contrast pairs: set fine.ncc_weight > 0")

    @property
    def fine_when_mapped(self) -> FineConfig:
        """The full-resolution level on a moving image mapped into the fixed contrast: ``fine`` with
        the ``contrast.fine_*_scale`` factors applied (``fine`` itself when all are 1)."""
        contrast = self.contrast
        return replace(self.fine, iterations=round(self.fine.iterations * contrast.fine_step_scale),
                       intensity_weight=self.fine.intensity_weight * contrast.fine_intensity_scale,
                       half_resolution_iterations=round(self.fine.half_resolution_iterations
                                                        * contrast.fine_half_resolution_scale))

    @property
    def uses_intensity_terms(self) -> bool:
        """Whether the program matches intensities (the refine channel or the full-resolution level),
        the terms that assume one contrast and that the contrast guard or rule may take away."""
        return self.refine.intensity_weight > 0 or self.fine.enabled


STAGES = {"affine": AffineConfig, "features": FeatureConfig, "coarse": CoarseConfig, "contrast": ContrastConfig,
          "refine": RefineConfig, "fine": FineConfig, "unfold": UnfoldConfig, "symmetric": SymmetricConfig}
RENAMED = {"refine.intensity_min_ncc": "contrast.min_ncc"}  # old key -> new key, named in the error
DEFAULT_PRESET = "lumir"


def preset_names() -> list[str]:
    """Names of the presets shipped in ``configs/``."""
    return sorted(p.name[:-5] for p in resources.files("jaxreg.configs").iterdir() if p.name.endswith(".toml"))


def _coerce(stage: str, key: str, value: Any, typ: Any) -> Any:
    """Coerce a TOML / command-line value to the field's type, with a one-line error if impossible."""
    where = f"{stage}.{key}"
    typ = str(typ)
    try:
        if typ == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, bool):
                raise ValueError
            return value
        if typ == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ.startswith("tuple[int"):
            return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if typ.startswith("tuple[float"):
            return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if typ == "str":
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{where} must be {typ.replace('tuple[', 'a list of ').replace(', ...]', 's')}, got {value!r}")


def config_from_dict(data: dict, name: str = "custom", base: RegistrationConfig | None = None) -> RegistrationConfig:
    """Build a config from nested dicts ``{stage: {key: value}}`` on top of `base` (defaults if None).

    Unknown stages or keys are rejected with the list of valid ones.
    """
    config = base or RegistrationConfig()
    name = str(data.get("name", name))
    sections = {}
    for stage, values in data.items():
        if stage == "name":
            continue
        if stage not in STAGES:
            raise ConfigError(f"unknown config section '{stage}': must be one of {', '.join(STAGES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{stage}' must be a table of key = value")
        cls = STAGES[stage]
        valid = {f.name: f.type for f in fields(cls)}
        for key in values:
            if f"{stage}.{key}" in RENAMED:
                new_stage, new_key = RENAMED[f"{stage}.{key}"].split(".")
                raise ConfigError(f"'{stage}.{key}' is now '{new_stage}.{new_key}' (key {new_key} in "
                                  f"section [{new_stage}]): rename it")
            if key not in valid:
                raise ConfigError(f"unknown key '{stage}.{key}': must be one of {', '.join(valid)}")
        coerced = {k: _coerce(stage, k, v, valid[k]) for k, v in values.items()}
        sections[stage] = replace(getattr(config, stage), **coerced)
    # all sections at once: the checks across sections see the whole new config
    return replace(config, name=name, **sections)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"refine.iterations=100"`` -> ("refine", "iterations", 100). Values use TOML syntax."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{text}' must look like stage.key=value, e.g. refine.iterations=100")
    lhs, rhs = text.split("=", 1)
    stage, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs.strip()  # bare words such as true/false are valid TOML; anything else stays a string
    return stage, key, value


def load_config(preset: str | Path = DEFAULT_PRESET, overrides: list[str] | tuple[str, ...] = ()) -> RegistrationConfig:
    """Load a preset by name (``lumir``, ``convexadam-lumir``, ``fast``) or from a TOML path, then apply
    ``stage.key=value`` overrides. A preset with ``extends = "NAME"`` (a preset name, or a TOML path
    relative to its own file) starts from that preset's values instead of the defaults."""
    config = _read_preset(str(preset), ())
    nested: dict[str, dict] = {}
    for text_override in overrides:
        stage, key, value = parse_override(text_override)
        nested.setdefault(stage, {})[key] = value
    if nested:
        config = config_from_dict(nested, name=config.name, base=config)
    return config


def _read_preset(preset: str, chain: tuple[str, ...]) -> RegistrationConfig:
    """The preset `preset` (a name or a TOML path) on top of the one it extends, if any; `chain`: the
    presets that extend it, to refuse a cycle."""
    if preset.endswith(".toml") or Path(preset).is_file():
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        text, name, folder, identity = path.read_text(), path.stem, path.parent, str(path.resolve())
    else:
        names = preset_names()
        if preset not in names:
            raise ConfigError(f"unknown preset '{preset}': must be one of {', '.join(names)} or a path to a .toml file")
        text, name = resources.files("jaxreg.configs").joinpath(f"{preset}.toml").read_text(), preset
        folder, identity = None, preset
    if identity in chain:
        raise ConfigError(f"preset '{preset}' extends itself ({' -> '.join([*chain, identity])}): "
                          "remove one of the extends keys")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config '{preset}' is not valid TOML: {err}") from None
    parent, base = data.pop("extends", None), None
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"config '{preset}': extends must name a preset or a .toml file, got {parent!r}")
        if parent.endswith(".toml") and folder is not None and not Path(parent).is_absolute():
            parent = str(folder / parent)
        base = _read_preset(parent, (*chain, identity))
    return config_from_dict(data, name=name, base=base)


def config_to_dict(config: RegistrationConfig) -> dict:
    """Plain nested dict (for reports and run logs)."""
    return dataclasses.asdict(config)


def preset_toml(config: RegistrationConfig, header: Sequence[str] = ()) -> str:
    """`config` as a preset file that :func:`load_config` reads back equal, under ``# `` comment lines."""
    comments = "".join(f"# {line}".rstrip() + "\n" for text in header for line in text.splitlines())
    data = {"name": config.name}
    for stage in STAGES:
        data[stage] = {key: list(value) if isinstance(value, tuple) else value
                       for key, value in dataclasses.asdict(getattr(config, stage)).items()}
    return comments + tomli_w.dumps(data)


def write_preset(config: RegistrationConfig, path: str | Path, header: Sequence[str] = ()) -> Path:
    """Write `config` as a TOML preset atomically (temporary file, then rename)."""
    from .io import atomic_output  # nibabel: imported only when a preset is written

    path = Path(path)
    if path.suffix != ".toml":
        raise ConfigError(f"output preset '{path}' must end in .toml (so that --preset reads it as a file)")
    with atomic_output(path) as tmp:
        tmp.write_text(preset_toml(config, header), encoding="utf-8")
    return path


# ConvexAdam's argument -> jaxreg's ``stage.key``, for readers of the reference code. Its
# ``selected_smooth`` (an extra smoothing of the final field) has no counterpart: the LUMIR runs set 0.
CONVEXADAM_NAMES = {
    "mind_r": "features.radius",
    "mind_d": "features.dilation",
    "grid_sp": "coarse.grid_spacing",
    "disp_hw": "coarse.search_radius",
    "ic": "coarse.inverse_consistent",
    "grid_sp_adam": "refine.grid_spacing",
    "selected_niter": "refine.iterations",
    "lambda_weight": "refine.diffusion_weight",
}


def convexadam_settings(config: RegistrationConfig) -> dict:
    """The reference ConvexAdam's keyword arguments (``convex_adam_pt``) that run `config`'s program:
    ``convexadam_settings(load_config("convexadam-lumir"))`` are the LUMIR organisers' settings."""
    settings = {}
    for name, where in CONVEXADAM_NAMES.items():
        stage, key = where.split(".")
        settings[name] = getattr(getattr(config, stage), key)
    return settings | {"selected_smooth": 0}
