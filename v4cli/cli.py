"""The `v4` command line: one Typer app, thin commands, one error boundary.

Each module in `v4cli/commands/` defines `register(app)`; command bodies parse flags, call the
library, and render. Library errors (`V4Error`) become one line naming what to do next.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
import sys
import warnings

import click
import typer
import typer.core

from kernels import cpu_ext
from v4cli import __version__, commands, ui
from v4cli.commands.options import normalize_flag
from quant.errors import V4Error, V4Warning


def _keep_argument_help(init):
    """click 8.5 gave Argument its own `help`, reset by click's __init__ after typer (≤0.25) has set it: without
    this, no argument's help reaches --help or docs/cli.md. A no-op once typer passes help through."""

    @functools.wraps(init)
    def __init__(self, *args, help: str | None = None, **kwargs):
        init(self, *args, help=help, **kwargs)
        self.help = self.help or help

    return __init__


typer.core.TyperArgument.__init__ = _keep_argument_help(typer.core.TyperArgument.__init__)

app = typer.Typer(
    name="v4",
    help="Run DeepSeek-V4-Flash locally: pull, quantize, chat, ask.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"token_normalize_func": normalize_flag},
    # click ≥ 8.4 (NoSuchCommand) already ends the error with "Did you mean"; typer's would say it a second time
    suggest_commands=not hasattr(click.exceptions, "NoSuchCommand"),
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"v4 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Run DeepSeek-V4-Flash locally: pull, quantize, chat, ask."""


for _mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
    _register = getattr(importlib.import_module(f"v4cli.commands.{_mod}"), "register", None)
    if _register is not None:  # options.py declares shared flags, no command
        _register(app)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """Our own warnings as one plain line on stderr; anyone else's as Python prints them."""
    if issubclass(category, V4Warning) and not os.environ.get("V4_DEBUG"):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app behind the one error boundary."""
    warnings.showwarning = _show_warning
    cpu_ext.on_build(ui.working)  # the one-time kernel compile is shown while it runs, not silent
    try:
        # without standalone mode click *returns* the exit code of typer.Exit and of Ctrl-C (130)
        rc = app(args=argv, prog_name="v4", standalone_mode=False)
        if rc == 130:
            print("interrupted", file=sys.stderr)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except V4Error as e:
        if os.environ.get("V4_DEBUG"):
            raise
        from v4cli.ui import error_line

        print(error_line(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # click usage errors carry their own exit codes
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
