"""Entry point of the ``jaxreg`` command: registers the plain command functions of the command
modules on one Typer app (the modules never import this one) and turns every failure into one line.

A library error (:class:`jaxreg.errors.JaxregError`) or a usage error becomes one ``error:`` line on
stderr and exit code 2; the commands never print tracebacks for bad input. Every command gets
``--verbose/-v`` and ``--quiet/-q`` here, so the command functions need not repeat them.
"""

from __future__ import annotations

import functools
import inspect
import sys

import typer

from jaxreg.errors import JaxregError

from .apply import apply_command
from .batch import batch_command
from .benchmark import benchmark_command
from .convert import convert_command
from .evaluate import evaluate_command
from .invert import invert_command
from .prepare import prepare_command
from .qc import qc_command
from .register import demo_command, presets_command, register_command
from .terminal import error_line, logging_to_stderr
from .tune import tune_command

# name -> plain function, in the order `jaxreg -h` lists them; a new command is one import and one line
COMMANDS = {
    "register": register_command,
    "demo": demo_command,
    "batch": batch_command,
    "evaluate": evaluate_command,
    "qc": qc_command,
    "apply": apply_command,
    "convert": convert_command,
    "invert": invert_command,
    "prepare": prepare_command,
    "tune": tune_command,
    "benchmark": benchmark_command,
    "presets": presets_command,
}

VERBOSE = typer.Option(0, "--verbose", "-v", count=True, help="Show the library's progress logs (-vv: debug).")
QUIET = typer.Option(False, "--quiet", "-q", help="Show only errors and results: no progress, no warnings.")


def with_output_options(command):
    """`command` with ``--verbose/-v`` and ``--quiet/-q`` added; logging is set up from them before
    it runs and put back after."""
    signature = inspect.signature(command, eval_str=True)  # Typer reads the evaluated annotations

    @functools.wraps(command)
    def run(*args, verbose: int = 0, quiet: bool = False, **kwargs):
        with logging_to_stderr(verbose, quiet):
            return command(*args, **kwargs)

    extra = [inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=VERBOSE, annotation=int),
             inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=QUIET, annotation=bool)]
    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    return run


def _version(value: bool) -> None:
    if value:
        from jaxreg import __version__

        typer.echo(f"jaxreg {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are shown as written: "jaxreg[ray]" is not markup
    context_settings={"help_option_names": ["-h", "--help"]},
    help="jaxreg: JAX instance-optimisation registration of 3-D brain MRI in the LUMIR format.")


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print jaxreg's version and exit.")) -> None:
    """jaxreg: JAX instance-optimisation registration of 3-D brain MRI in the LUMIR format."""


for _name, _function in COMMANDS.items():
    app.command(_name)(with_output_options(_function))


# Typer's parse errors are click's ClickException (vendored by recent Typer, imported by older Typer):
# found through the public BadParameter, so that both work
_ParseError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; library and usage errors become one ``error:`` line and exit code 2."""
    try:
        returned = app(args=argv, prog_name="jaxreg", standalone_mode=False)
    except JaxregError as err:
        error_line(str(err))
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        error_line("interrupted")
        return 130
    except _ParseError as err:  # bad option, missing argument, bad value
        context = getattr(err, "ctx", None)
        where = f" (see '{context.command_path} -h')" if context is not None else ""
        error_line(f"{err.format_message()}{where}")
        return 2
    return returned if isinstance(returned, int) else 0


if __name__ == "__main__":
    sys.exit(main())
