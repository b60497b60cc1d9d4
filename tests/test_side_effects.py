"""jaxreg changes nothing global: importing it or registering leaves the environment and JAX's
configuration as they were; its XLA options go to its own programs; the compilation cache is turned
on only by ``jaxreg.configure``."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxreg import compilation, xla_options

YNN = "xla_cpu_experimental_ynn_fusion_type"

# Prints, as JSON, the environment and JAX's cache settings before and after importing every jaxreg
# module and registering a small pair.
PROBE = r"""
import json, os, sys
import jax
def snapshot():
    return {"env": dict(os.environ), "cache_dir": jax.config.jax_compilation_cache_dir,
            "min_compile": jax.config.jax_persistent_cache_min_compile_time_secs}
before = snapshot()
import numpy as np
import jaxreg, jaxreg.registration, jaxreg.compilation, jaxreg.pipeline, jaxreg.ops.native.kernels
import jaxreg.apps.batch, jaxreg.apps.benchmark, jaxreg.cli.main
imported = snapshot()
x = np.random.default_rng(0).random((16, 16, 16)).astype("float32")
jaxreg.register(x, x, config=jaxreg.load_config("fast", ["refine.iterations=2"]))
print(json.dumps({"XLA_FLAGS": os.environ.get("XLA_FLAGS"), "unchanged_by_import": imported == before,
                  "unchanged_by_register": snapshot() == before}))
"""


def _run(script: str, env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=600, check=True)


@pytest.mark.parametrize("xla_flags", [None, "--xla_cpu_multi_thread_eigen=true"])
def test_importing_jaxreg_and_registering_change_no_environment_variable_and_no_jax_setting(xla_flags, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXREG_CACHE_DIR")}
    env["HOME"] = str(tmp_path)  # where a compilation cache would be made by default
    env["JAXREG_NATIVE_DIR"] = os.environ.get("JAXREG_NATIVE_DIR", str(Path.home() / ".cache" / "jaxreg" / "native"))
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    report = json.loads(_run(PROBE, env).stdout.strip().splitlines()[-1])
    assert report == {"XLA_FLAGS": xla_flags, "unchanged_by_import": True, "unchanged_by_register": True}
    assert not (tmp_path / ".cache" / "jaxreg" / "xla").exists()


def test_import_prints_the_xla_flags_it_found():
    """The issue's own check: ``import os, jaxreg; print(os.environ.get('XLA_FLAGS'))``."""
    script = "import os, jaxreg; print(os.environ.get('XLA_FLAGS'))"
    for flags in (None, "--xla_cpu_multi_thread_eigen=true"):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | ({} if flags is None else {"XLA_FLAGS": flags})
        assert _run(script, env).stdout.strip() == str(flags)


CONFIGURE = r"""
import json, sys
import jax, jaxreg
kwargs = json.loads(sys.argv[1])
settings = jaxreg.configure(**kwargs)
print(json.dumps({"settings": settings, "cache_dir": jax.config.jax_compilation_cache_dir,
                  "min_compile": jax.config.jax_persistent_cache_min_compile_time_secs}))
"""


def _configure(env: dict, **kwargs) -> tuple[dict, str]:
    done = _run(CONFIGURE, env, json.dumps(kwargs))
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _clean_env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAXREG_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    return env | changes


@pytest.mark.slow
def test_configure_turns_the_compilation_cache_on_and_returns_what_it_set(tmp_path):
    folder = tmp_path / "xla"
    report, _ = _configure(_clean_env(), cache_dir=str(folder), min_compile_seconds=2.0)
    assert report == {"settings": {"cache_dir": str(folder), "min_compile_seconds": 2.0},
                      "cache_dir": str(folder), "min_compile": 2.0}
    assert folder.is_dir()
    # the default folder: $JAXREG_CACHE_DIR, else ~/.cache/jaxreg/xla; JAX's own minimum wins
    report, _ = _configure(_clean_env(HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="7"))
    default = str(tmp_path / ".cache" / "jaxreg" / "xla")
    assert report["settings"] == {"cache_dir": default, "min_compile_seconds": None}
    assert report["cache_dir"] == default and report["min_compile"] == 7.0
    report, _ = _configure(_clean_env(JAXREG_CACHE_DIR=str(tmp_path / "elsewhere")))
    assert report["settings"]["cache_dir"] == str(tmp_path / "elsewhere")
    for env, kwargs in ((_clean_env(JAXREG_CACHE_DIR=""), {}), (_clean_env(), {"cache_dir": None})):
        report, _ = _configure(env, **kwargs)
        assert report["settings"] == {"cache_dir": None, "min_compile_seconds": None} and report["cache_dir"] is None


def test_configure_without_a_writable_home_keeps_no_cache_and_says_so_in_one_line(tmp_path):
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    report, stderr = _configure(_clean_env(HOME=str(home)))
    assert report["settings"] == {"cache_dir": None, "min_compile_seconds": None} and report["cache_dir"] is None
    warnings = [line for line in stderr.splitlines() if "not kept between processes" in line]
    assert len(warnings) == 1 and "JAXREG_CACHE_DIR" in warnings[0]


def test_cpu_programs_get_jaxreg_s_options_unless_xla_flags_set_them(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    if not xla_options._cpu_accepts(YNN, ""):
        pytest.skip("this jaxlib does not know the YNNPACK fusion option")
    assert xla_options.compiler_options("cpu") == {YNN: ""}
    assert xla_options.compiler_options("cuda") == {} and xla_options.compiler_options("tpu") == {}
    monkeypatch.setenv("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true --{YNN}=reduce")
    assert xla_options.compiler_options("cpu") == {}  # the user's setting wins


def test_an_option_the_jaxlib_does_not_know_is_left_out_with_a_debug_line(monkeypatch, caplog):
    monkeypatch.setattr(xla_options, "CPU_OPTIONS", {"xla_cpu_no_such_option_in_any_jaxlib": "1"})
    with caplog.at_level(logging.DEBUG, logger="jaxreg.xla_options"):
        assert xla_options.compiler_options("cpu") == {}
        executable = xla_options.compile_jitted(jax.jit(lambda x: x * 2), jnp.ones(3))
    assert [float(v) for v in executable(jnp.ones(3))] == [2.0, 2.0, 2.0]
    assert sum("xla_cpu_no_such_option_in_any_jaxlib" in r.getMessage() for r in caplog.records) == 1


def test_the_option_reaches_the_compiled_programs(monkeypatch):
    """A leading-axis reduction compiled by jaxreg has no YNNPACK fusion (the 50-70x slower one);
    nor has jaxreg's registration program."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    stack = jax.ShapeDtypeStruct((12, 20, 28, 24), jnp.float32)
    reduction = jax.jit(lambda a: jnp.sum(a, axis=0))
    if "__ynn_fusion" not in reduction.lower(stack).compile().as_text():
        pytest.skip("this jaxlib makes no YNNPACK fusion of a leading-axis reduction")
    assert "__ynn_fusion" not in xla_options.compile_jitted(reduction, stack).as_text()
    from jaxreg.config import load_config
    executable, _ = compilation.compiled_program(load_config("fast"), (16, 20, 12), False)
    assert "__ynn_fusion" not in executable.field.as_text()
    from jaxreg.ops import invert  # nor have the inversion's grid rounds (a sum over the 3 components)
    field = jnp.zeros((3, 16, 20, 12), jnp.float32)
    assert "__ynn_fusion" not in invert._compiled(invert._grid_rounds_jit, field, field).as_text()
