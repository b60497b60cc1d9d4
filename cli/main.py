"""Entry point of the `jaxreg` command: builds the Typer app from the per-command modules.

Every library error (:class:`jaxreg.errors.JaxregError`) becomes one line on stderr and exit code 2;
the commands themselves never print tracebacks for bad input.
"""

from __future__ import annotations

import sys

import typer

from jaxreg.errors import JaxregError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="jaxreg: JAX instance-optimisation registration of 3-D brain MRI in the LUMIR format.")

# --- commands: each module registers its own command(s) on `app` ----------------------------
from . import register as _register  # noqa: E402,F401  (jaxreg register, demo, presets)
from . import evaluate as _evaluate  # noqa: E402,F401  (jaxreg evaluate)
from . import benchmark as _benchmark  # noqa: E402,F401  (jaxreg benchmark)
from . import batch as _batch  # noqa: E402,F401  (jaxreg batch)
from . import qc as _qc  # noqa: E402,F401  (jaxreg qc)
from . import prepare as _prepare  # noqa: E402,F401  (jaxreg prepare)
from . import tune as _tune  # noqa: E402,F401  (jaxreg tune)
# --- end of commands ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; turn library errors into one line and a non-zero exit code."""
    try:
        returned = app(args=argv, standalone_mode=False)  # non-standalone mode returns typer.Exit codes
    except JaxregError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.exceptions.TyperException as err:  # usage errors: bad option, missing argument
        if hasattr(err, "show"):
            err.show()
        else:
            typer.echo(f"error: {err.format_message()}", err=True)
        return err.exit_code
    return returned if isinstance(returned, int) else 0


if __name__ == "__main__":
    sys.exit(main())
