"""Option and argument aliases shared by several command groups (declared once, same help)."""

from __future__ import annotations

from typing import Annotated

import typer

from doge_cli.config.presets import HARDWARE_NAMES, SIZES

SizeOpt = Annotated[
    str | None,
    typer.Option("--size", "-s", help=f"Model size preset: {', '.join(SIZES)} (1M and 5M are tiny CPU sizes)."),
]
HardwareOpt = Annotated[
    str | None,
    typer.Option(
        "--hardware",
        help=f"Hardware preset: {', '.join(HARDWARE_NAMES)} (auto detects the machine). "
        "Sets micro batch, precision, attention backend and data-loader workers.",
    ),
]
RecipeAndOverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="An optional YAML recipe (e.g. configs/doge/Doge-20M/pt.yaml) followed by dotted overrides "
        "such as optim.lr=3e-3 data.max_length=1024. Precedence: defaults < size < hardware < recipe < overrides.",
        show_default=False,
    ),
]

DtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="Weights' precision: auto (the model's own, as saved), fp32 or bf16.")]
QuantizeOpt = Annotated[str | None, typer.Option(
    "--quantize", help="int8: weight-only int8 linear layers, a quarter of fp32's bytes (CPU only; README: "
    "'CPU inference' has the measured speed and quality).", show_default=False)]


def split_recipe_and_overrides(args: list[str] | None) -> tuple[str | None, list[str]]:
    """The first argument is a recipe when it is not of the form key=value."""
    args = list(args or [])
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args
