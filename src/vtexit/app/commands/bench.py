"""``vtexit bench`` and ``vtexit flops``: what VTW saves, measured (latency, KV bytes) and counted (FLOPs).

Both print the FLOPs formula they use, so the measured and the analytic numbers can be read side by side.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from vtexit.app.common import MODEL_HELP, console, load_model, parse_layers, require_for, set_threads


def bench(
    model: str = typer.Option("default", help=MODEL_HELP),
    layers: str = typer.Option(None, help="comma-separated K values (default: N/4, N/2, 3N/4)"),
    batch_size: int = typer.Option(1, min=1),
    new_tokens: int = typer.Option(32, min=2),
    repeats: int = typer.Option(5, min=1),
    seed: int = typer.Option(0),
    attn: str = typer.Option("sdpa", help="attention implementation: sdpa or eager"),
    threads: int = typer.Option(1, help="torch threads (1 gives the steadiest numbers)"),
) -> None:
    """Latency, decode time and KV bytes of VTW vs the unpatched model, with the FLOPs ratio beside them."""
    from vtexit.core.flops import FORMULA
    from vtexit.evaluation.bench import bench_withdrawal
    from vtexit.evaluation.report import bench_table
    from vtexit.methods.vtw import check_layer, valid_layer_range

    require_for(model, easy_vqa=True)
    set_threads(threads)
    source = load_model(model, attn)
    low, n = valid_layer_range(source.model)
    ks = parse_layers(layers) or sorted({max(low, n // 4), max(low, n // 2), max(low, 3 * n // 4)})
    try:
        ks = [check_layer(source.model, k) for k in ks]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--layers") from None
    inputs = source.make_batches(batch_size, batch_size, "test", seed)[0]
    rows = bench_withdrawal(source.model, inputs, ks, repeats=repeats, new_tokens=new_tokens)
    console.print(bench_table(rows))
    console.print(f"[dim]FLOPs: {escape(FORMULA)}[/]")


def flops(
    model: str = typer.Option("default", help=MODEL_HELP),
    layer: int = typer.Option(..., help="withdrawal layer K"),
    prompt_tokens: int = typer.Option(..., min=1),
    visual_tokens: int = typer.Option(..., min=0),
) -> None:
    """Analytic prefill and per-decode-token FLOPs of VTW at K vs the unpatched model."""
    from vtexit.core.flops import FORMULA, DecoderShape, count, withdrawal_tokens
    from vtexit.methods.vtw import check_layer

    require_for(model, easy_vqa=False)
    source = load_model(model, "sdpa", with_processor=False)  # shapes come from the config: no processor needed
    try:
        check_layer(source.model, layer)
        shape = DecoderShape.from_model(source.model)
        base = count(shape, withdrawal_tokens(shape.num_layers, prompt_tokens, visual_tokens, shape.num_layers))
        vtw = count(shape, withdrawal_tokens(shape.num_layers, prompt_tokens, visual_tokens, layer))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    console.print(
        f"prefill: {base.prefill / 1e9:.3f} -> {vtw.prefill / 1e9:.3f} GFLOPs ({base.prefill / vtw.prefill:.2f}x)"
    )
    console.print(
        f"decode/token: {base.decode_per_token / 1e6:.2f} -> {vtw.decode_per_token / 1e6:.2f} MFLOPs "
        f"({base.decode_per_token / vtw.decode_per_token:.2f}x)"
    )
    console.print(f"[dim]{escape(FORMULA)}[/]")
