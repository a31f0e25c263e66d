"""The `minidiff` command line: parses options and calls into the package; no logic lives here."""

import click

from minidiff import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minidiff")
def main():
    """minidiff: diffusion models from scratch on NumPy/CuPy, no autograd."""


if __name__ == "__main__":
    main()
