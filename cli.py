"""The `minidiff` command line: parses options and calls into the package; no logic lives here."""

import click

from minidiff import __version__, optim_demo


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minidiff")
def main():
    """minidiff: diffusion models from scratch on NumPy/CuPy, no autograd."""


class _OneLineUsageErrors(click.Command):
    """Usage errors (bad option or value) as one line, exit code 2, no usage block and no traceback."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:  # without a context, click prints only "Error: <message>"
            raise click.UsageError(f"{exc.format_message()} (see '{ctx.command_path} --help')") from None


@main.command("optim-demo", cls=_OneLineUsageErrors)
@click.option("--optimizer", "-o", "optimizers", multiple=True, type=click.Choice(optim_demo.DEMO_OPTIMIZERS),
              help="Repeat to choose several (default: all).")
@click.option("--problem", "-p", "problems", multiple=True, type=click.Choice(optim_demo.PROBLEMS),
              help="Repeat to choose several (default: both).")
@click.option("--kappa", type=click.FloatRange(min=1.0), default=100.0, show_default=True,
              help="Condition number of the quadratic.")
@click.option("--tol", type=click.FloatRange(min=0.0, min_open=True), default=1e-6, show_default=True,
              help="Converged when ||x - x*|| <= tol.")
@click.option("--max-steps", type=click.IntRange(min=1), default=40000, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Save a PNG of the trajectories here (needs matplotlib).")
def optim_demo_command(optimizers, problems, kappa, tol, max_steps, out):
    """Run the optimizers on a quadratic and on Rosenbrock; print steps to reach the tolerance."""
    try:
        table = optim_demo.run_demo(optimizers or optim_demo.DEMO_OPTIMIZERS, problems or optim_demo.PROBLEMS,
                                    kappa=kappa, tol=tol, max_steps=max_steps, out=out)
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(table)
    if out:
        click.echo(f"trajectories written to {out}")


if __name__ == "__main__":
    main()
