"""``doge upcycle``: a dense Doge into a CDMoE Doge that starts from the same function (doge_cli.model.upcycle)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def upcycle(
    dense: Annotated[str, typer.Argument(help="Dense model folder (e.g. runs/pt/final) or hub id.",
                                         show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The CDMoE model folder to write.", show_default=False)],
    num_experts: Annotated[int, typer.Option("--num-experts", help="Single-neuron experts per layer (a perfect "
                                             "square: product-key routing).")] = 16384,
    experts_per_token: Annotated[int, typer.Option("--experts-per-token", help="Experts each token uses.")] = 32,
    init: Annotated[str, typer.Option("--init", help="zero: up_embed = 0, exactly the dense model's function at "
                                      "step 0; normal: normal(0, initializer_range) as small-doge does.")] = "zero",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the new router and expert weights.")] = 0,
    router_aux_loss_coef: Annotated[float, typer.Option(
        "--router-aux-loss-coef", help="Weight of the router's load-balancing loss in continuation training "
        "(transformers' DogeConfig default, as small-doge's MoE recipes use).")] = 0.001,
) -> None:
    """Turn a dense Doge into a CDMoE Doge (the dense MLP stays as the shared expert, routed single-neuron
    experts are added) to continue pretraining with `doge train pt --init-from OUT`."""
    from doge_cli.model import load_model
    from doge_cli.model.upcycle import added_parameters
    from doge_cli.model.upcycle import upcycle as run_upcycle

    written = run_upcycle(dense, out, num_experts=num_experts, experts_per_token=experts_per_token, init=init,
                          seed=seed, router_aux_loss_coef=router_aux_loss_coef)
    config = load_model(str(written), attn_implementation="eager").config
    typer.echo(f"upcycled {dense} into {written}: {config.num_hidden_layers} layers x {num_experts} experts, "
               f"top {experts_per_token}, {added_parameters(config, num_experts):,} parameters added, init {init}, "
               f"router aux loss coefficient {config.router_aux_loss_coef:g}")
