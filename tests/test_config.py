"""The configuration: validation, the TOML writer, the ConvexAdam mapping, the compile key."""

import tomllib
from dataclasses import replace

import pytest

from jaxreg.config import (CONVEXADAM_NAMES, ConfigError, RegistrationConfig, config_to_dict, convexadam_settings,
                           load_config, preset_names, preset_toml, write_preset)

from synthetic import SHAPE


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_round_trips_through_the_writer(preset, tmp_path):
    config = load_config(preset)
    path = write_preset(config, tmp_path / "copy.toml", ["two lines\nof header"])
    assert path.read_text().startswith("# two lines\n# of header\n")
    again = load_config(path)
    assert again == config and config_to_dict(again) == config_to_dict(config)  # the name too


def test_writer_keeps_every_non_default_value():
    config = load_config("lumir", ["refine.diffusion_weight=2.5", "coarse.coupling_weights=[0.5, 2]",
                                   "affine.enabled=true", "contrast.min_ncc=0.25"])
    data = tomllib.loads(preset_toml(config))
    assert data["refine"]["diffusion_weight"] == 2.5 and data["coarse"]["coupling_weights"] == [0.5, 2.0]
    assert data["affine"]["enabled"] is True and data["contrast"]["min_ncc"] == 0.25 and data["name"] == "lumir"
    with pytest.raises(ConfigError, match="must end in .toml"):
        write_preset(config, "preset.txt")


@pytest.mark.parametrize("weights, message", [
    ("[]", "at least one weight"),
    ("[0.1, inf]", "finite and >= 0"),
    ("[0.1, nan]", "finite and >= 0"),
    ("[-0.1, 1]", "finite and >= 0"),
    ("[1, 0.3]", "not decrease"),
])
def test_coupling_weights_are_validated(weights, message):
    with pytest.raises(ConfigError, match=rf"coarse\.coupling_weights must (list |be )?{message}"):
        load_config("fast", [f"coarse.coupling_weights={weights}"])


def test_coupling_weights_may_repeat_start_at_zero_or_be_one():
    for weights in ("[0, 0.5, 0.5, 1]", "[1.0]", "2"):
        assert load_config("fast", [f"coarse.coupling_weights={weights}"]).coarse.coupling_weights


def test_convexadam_settings_come_from_the_convexadam_lumir_preset():
    """The LUMIR organisers' ConvexAdam settings (LUMIR.md, "ConvexAdam as the organisers ran it")."""
    assert convexadam_settings(load_config("convexadam-lumir")) == {
        "mind_r": 1, "mind_d": 2, "grid_sp": 2, "disp_hw": 2, "ic": True, "grid_sp_adam": 2,
        "selected_niter": 80, "lambda_weight": 1.6, "selected_smooth": 0}
    for where in CONVEXADAM_NAMES.values():  # every name points at a real setting
        stage, key = where.split(".")
        assert hasattr(getattr(RegistrationConfig(), stage), key)


def test_configs_that_differ_only_by_name_share_one_compiled_program():
    from jaxreg import compilation, xla_options

    config = load_config("convexadam-lumir", ["refine.iterations=30"])  # the program the other tests compile
    renamed = replace(config, name="another name")
    assert renamed == config and hash(renamed) == hash(config)
    first, _ = compilation.compiled_program(config, SHAPE, False)
    count = len(xla_options._executables)
    second, seconds = compilation.compiled_program(renamed, SHAPE, False)
    assert second is first and seconds == 0.0 and len(xla_options._executables) == count
    assert load_config("fast") != load_config("convexadam-lumir")  # the settings still count


@pytest.mark.parametrize("override, message", [
    ("affine.enabled=true", "symmetric.enabled needs affine.enabled = false"),
    ("fine.enabled=false", "symmetric.enabled needs the full-resolution level"),
])
def test_symmetric_program_refuses_what_it_cannot_average_or_refit(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("lumir-symmetric", [override])
    assert load_config("lumir", [override])  # the one-way preset takes it


def test_sections_are_checked_together_whatever_their_order():
    """A TOML may list [symmetric] before [fine]: the checks across sections see the finished config."""
    from jaxreg.config import config_from_dict
    config = config_from_dict({"symmetric": {"enabled": True}, "fine": {"enabled": True, "iterations": 5}})
    assert config.symmetric.enabled and config.fine.iterations == 5


def test_lumir_symmetric_is_lumir_both_ways_and_nothing_else():
    """The preset extends lumir: a change to lumir reaches it."""
    assert load_config("lumir-symmetric") == load_config("lumir", ["refine.symmetric=false", "symmetric.enabled=true"])
    assert load_config("lumir-symmetric").name == "lumir-symmetric"


def test_a_preset_extends_another_by_name_or_by_a_path_next_to_it(tmp_path):
    (tmp_path / "more_steps.toml").write_text('extends = "lumir"\n[fine]\niterations = 30\n')
    config = load_config(tmp_path / "more_steps.toml")
    assert config == load_config("lumir", ["fine.iterations=30"]) and config.name == "more_steps"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "stiffer.toml").write_text('name = "stiff"\nextends = "../more_steps.toml"\n'
                                                   '[fine]\ndiffusion_weight = 1.6\n')
    config = load_config(tmp_path / "sub" / "stiffer.toml", ["refine.iterations=30"])
    assert config == load_config("lumir", ["fine.iterations=30", "fine.diffusion_weight=1.6", "refine.iterations=30"])
    assert config.name == "stiff"
    # without extends, a file starts from the defaults (convexadam-lumir's values), as before
    (tmp_path / "plain.toml").write_text("[fine]\nenabled = true\n")
    assert load_config(tmp_path / "plain.toml").refine.symmetric is False


def test_a_preset_that_extends_what_does_not_exist_or_itself_is_one_line(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "lumri"\n')
    with pytest.raises(ConfigError, match="unknown preset 'lumri': must be one of"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"extends itself \(.*a.toml -> .*b.toml -> .*a.toml\)"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="extends must name a preset or a .toml file, got 3"):
        load_config(tmp_path / "c.toml")
