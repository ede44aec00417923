"""The `lorsa-surgery` command line: a thin click layer over the library's public functions."""

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
    # Loading a model prints a bar per file and a warning per quirk; the work itself keeps its own bars.
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


def _register() -> None:
    from lorsa_surgery.cli import checkpoint, demo, heal, hub, interventions, run, train

    main.add_command(checkpoint.inspect)
    main.add_command(hub.push)
    main.add_command(hub.pull)
    main.add_command(run.replace)
    main.add_command(run.generate)
    main.add_command(train.train)
    main.add_command(heal.heal)
    main.add_command(interventions.ablate)
    main.add_command(interventions.steer)
    main.add_command(interventions.patch)
    main.add_command(demo.demo)

    from lorsa_surgery.cli import heads, heads_analysis, tasks

    main.add_command(tasks.tasks)
    main.add_command(heads.heads)  # heads_analysis adds top, zpattern, dashboard and label to this group


_register()
