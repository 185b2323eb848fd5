"""``capsgan new-plugin``: write an installable plugin package (:mod:`capsgan_toolkit.tools.scaffold`)."""

from __future__ import annotations

import click

from capsgan_toolkit.cli.common import console, friendly, option
from capsgan_toolkit.tools.scaffold import FAMILIES, new_plugin


@click.command("new-plugin")
@click.argument("name")
@option("--family", type=click.Choice(FAMILIES), default="encoder",
        help="The component family (metric_features has no template yet).")
@option("--out", type=click.Path(file_okay=False), default=None, help="Folder to write.  [default: ./capsgan-NAME]")
@friendly
def new_plugin_command(name, family, out):
    """Write an installable plugin package with a new component NAME of --family, its tests and a recipe."""
    folder = new_plugin(name, family, out)
    module = f"capsgan_{name}"
    shown = str(folder) if folder.is_absolute() else f"./{folder}"  # pip reads "enc[test]" as a project name
    console.print(f"Wrote [bold]{folder}[/]: the {family} \"{name}\" ({module}/__init__.py), pyproject.toml, "
                  f"tests/test_{name}.py, recipes/{name}_quickstart.toml, README.md.", highlight=False, soft_wrap=True)
    console.print("Next:\n"
                  f"  pip install -e '{shown}[test]'   # registers it (entry point group \"capsgan\")\n"
                  f"  cd {shown} && pytest\n"
                  f"  capsgan run recipes/{name}_quickstart.toml", highlight=False, markup=False, soft_wrap=True)
