"""The `lorsa-surgery` command line: a thin click layer over the library's public functions.

The command modules import the library inside their commands, and generate options from configs that import no
torch, so `--help` and a mistyped option answer at once, without loading torch or transformers.
"""

import functools

import click

from lorsa_surgery.errors import LorsaSurgeryError


class _Group(click.Group):
    """Turns every error into one line and a non-zero exit: no input prints a traceback unless --verbose asks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except LorsaSurgeryError as e:
            raise click.ClickException(" ".join(str(e).split())) from e
        except KeyboardInterrupt:
            raise click.ClickException("Interrupted; what was already saved is kept.") from None
        except Exception as e:
            if ctx.params.get("verbose"):
                raise
            if isinstance(e, OSError) and e.strerror:  # disk full, permission denied: the input is fine, the machine is not
                what = f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
            else:
                what = f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            raise click.ClickException(f"{what} (run with --verbose before the command for the traceback).") from e


@click.group(cls=_Group)
@click.version_option(package_name="lorsa-surgery")
@click.option("--verbose", is_flag=True, help="Show the loaders' progress bars and warnings (hidden otherwise).")
def main(verbose: bool) -> None:
    """Splice Lorsa modules into Hugging Face causal LMs and work with their heads."""


def _set_loaders_verbosity(verbose: bool) -> None:
    """Loading a model prints a bar per file and a warning per quirk: shown with --verbose only (the work itself
    keeps its own bars)."""
    import huggingface_hub.utils
    import transformers

    logging = transformers.utils.logging
    if verbose:
        huggingface_hub.utils.enable_progress_bars()
        logging.enable_progress_bar()
        logging.set_verbosity_warning()
    else:
        huggingface_hub.utils.disable_progress_bars()
        logging.disable_progress_bar()
        logging.set_verbosity_error()


def _loaders_set_when_run(command: click.Command) -> None:
    """Make `command` (every command of a group) set the loaders' verbosity as it starts to run: not in the group's
    callback, which also runs before a command's --help or a refused option, and would load transformers for them."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _loaders_set_when_run(sub)
        return
    callback = command.callback

    @functools.wraps(callback)
    def run(*args, **kwargs):
        _set_loaders_verbosity(bool(click.get_current_context().find_root().params.get("verbose")))
        return callback(*args, **kwargs)

    command.callback = run


def _register() -> None:
    # heads_analysis adds top, zpattern, dashboard, label and the others to the `heads` group, heads_export `export`
    from lorsa_surgery.cli import (checkpoint, circuit, demo, heads, heads_analysis, heads_export, heal, hub,  # noqa: F401
                                   interventions, run, tasks, train)

    for command in (checkpoint.inspect, hub.push, hub.pull, run.replace, run.generate, train.train, heal.heal,
                    interventions.ablate, interventions.steer, interventions.patch, demo.demo, tasks.tasks, heads.heads,
                    circuit.circuit):
        _loaders_set_when_run(command)
        main.add_command(command)


_register()
