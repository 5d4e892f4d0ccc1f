"""attnbench: benchmark and profile efficient vision attention.

The typer app. It parses, calls the packages and prints; it holds no logic of
its own.
"""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Benchmark and profile efficient vision attention: eight mechanisms, one interface, honest numbers.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.callback()
def main() -> None:
    """Sweep attention mechanisms, count their FLOPs, train models and write HTML reports."""

JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


@app.command("list")
def list_(as_json: bool = JSON_OPTION) -> None:
    """List the registered attention mechanisms, their knobs (with defaults) and cost knob."""
    import attentions

    rows = [attentions.get(name).describe() for name in attentions.available()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="attention mechanisms")
    for col in ("mechanism", "knobs (defaults)", "cost knob", "cross", "complexity", "impls"):
        table.add_column(col)
    for r in rows:
        knobs = ", ".join(f"{k}={v['default']}" for k, v in r["knobs"].items())
        table.add_row(r["name"], knobs, r["cost_knob"] or "-", r["cross"], r["complexity"], ", ".join(r["impls"]))
    console.print(table)


# -- further commands are added below this line, one function each --


FLOPS_MECHANISM_OPTION = typer.Option(None, "--mechanism", "-m", help="A registered mechanism (see `attnbench list`).")
FLOPS_MODEL_OPTION = typer.Option(
    None, "--model", help="A model: a name in models.create, or any nn.Module factory as package.module:function."
)
FLOPS_RESOLUTION_OPTION = typer.Option(
    "14x14", "--resolution", "-r", help="Token map HxW (or one side) for a mechanism; image pixels for a model."
)
FLOPS_KNOB_OPTION = typer.Option(None, "--knob", "-k", help="A mechanism knob as k=v; repeat for several.")
FLOPS_CONTEXT_OPTION = typer.Option(None, "--context-resolution", help="Context map HxW for --cross (default: own).")


def _flops_hw(text: str, label: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise typer.BadParameter(f"{label} must be H x W like 14x14 (or one side like 14), got {text!r}")
    return hw  # type: ignore[return-value]


def _flops_model(spec: str, tiny: bool):
    """Build a model from models.create(name) or from a package.module:factory spec."""
    import importlib

    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        factory = getattr(importlib.import_module(module_name), attr, None)
        if not callable(factory):
            raise typer.BadParameter(f"--model {spec}: {module_name} has no callable {attr!r}")
        return factory()
    import models

    create = getattr(models, "create", None)
    if create is None:
        raise typer.BadParameter(
            f"--model {spec}: there is no model zoo yet (models.create does not exist); "
            "pass a factory as package.module:function, or count from Python with bench.flops.count(module, args)"
        )
    return create(spec, tiny=tiny) if tiny else create(spec)


@app.command("flops")
def flops_(
    mechanism: str = FLOPS_MECHANISM_OPTION,
    model: str = FLOPS_MODEL_OPTION,
    resolution: str = FLOPS_RESOLUTION_OPTION,
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="Batch size."),
    knob: list[str] = FLOPS_KNOB_OPTION,
    dim: int = typer.Option(96, "--dim", help="Channels of the mechanism."),
    heads: int = typer.Option(3, "--heads", help="Attention heads of the mechanism."),
    cross: bool = typer.Option(False, "--cross", help="Cross attention (keys and values from a context map)."),
    context_resolution: str = FLOPS_CONTEXT_OPTION,
    impl: str = typer.Option(None, "--impl", help="Implementation to count (default: the mechanism's fastest)."),
    tiny: bool = typer.Option(False, "--tiny", help="The tiny variant of a zoo model."),
    in_chans: int = typer.Option(3, "--in-chans", help="Image channels of a model's input."),
    backward: bool = typer.Option(True, "--backward/--no-backward", help="Also measure the backward pass."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Count multiply-adds (MACs; FLOPs = 2 x MACs) of one mechanism at one point, or of a whole model."""
    import torch

    import attentions
    from bench import flops as flopcount

    if (mechanism is None) == (model is None):
        raise typer.BadParameter("give exactly one of --mechanism NAME or --model NAME")
    hw = _flops_hw(resolution, "--resolution")
    if mechanism is not None:
        values = {}
        for item in knob or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise typer.BadParameter(f"--knob takes k=v (e.g. --knob window=7), got {item!r}")
            values[key.strip()] = value.strip()
        try:
            module = attentions.build(mechanism, dim=dim, heads=heads, impl=impl, **values)
        except (KeyError, ValueError) as exc:
            raise typer.BadParameter(str(exc).strip("'\"")) from None
        context_hw = _flops_hw(context_resolution, "--context-resolution") if context_resolution else None
        if context_hw is not None and not cross:
            raise typer.BadParameter("--context-resolution needs --cross")
        if cross and not module.supports_cross:
            raise typer.BadParameter(f"{mechanism} does not support cross attention; drop --cross")
        reasons = module.unsupported(batch, hw, context_hw if cross else None)
        if reasons:
            raise typer.BadParameter("; ".join(reasons))
        args = module.example_inputs(batch, hw, cross=cross, context_hw=context_hw)
        what = f"{mechanism} ({module.impl}) at {hw[0]}x{hw[1]} tokens, batch {batch}, dim {dim}, heads {heads}"
        what += f", cross with {args[3][0]}x{args[3][1]} context" if len(args) > 3 else ""
        analytic = None
    else:
        net = _flops_model(model, tiny)
        if not isinstance(net, torch.nn.Module):
            raise typer.BadParameter(f"--model {model} did not build an nn.Module (got {type(net).__name__})")
        args = (torch.randn(batch, in_chans, hw[0], hw[1]),)
        module = net
        what = f"model {model} at {hw[0]}x{hw[1]} px, batch {batch}"
        model_macs = getattr(net, "macs", None)
        analytic = (lambda m, a: int(model_macs(batch, hw))) if callable(model_macs) else None
    result = flopcount.count(module, args, analytic=analytic, backward=backward)
    if as_json:
        typer.echo(json.dumps({"what": what, **result.as_dict()}, indent=2))
        return

    def row(label: str, macs: int | None, note: str = "") -> None:
        if macs is None:
            table.add_row(label, "-", "-", "-", note)
        else:
            table.add_row(label, f"{macs:,}", f"{macs / 1e9:.4f}", f"{2 * macs / 1e9:.4f}", note)

    table = Table(title=f"multiply-adds of one call: {what}", caption="MACs = multiply-adds; FLOPs = 2 x MACs")
    for col, justify in (("count", "left"), ("MACs", "right"), ("GMACs", "right"), ("GFLOPs", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    err = result.relative_error()
    row("forward: fvcore + handles", result.macs, result.status())
    row("forward: analytic macs()", result.analytic_macs, "" if err is None else f"counter differs by {err:.2%}")
    fc_note = result.flop_counter_error or (
        "INCOMPLETE: " + ", ".join(f"{k} x{v}" for k, v in result.flop_counter_uncovered.items())
        if result.flop_counter_uncovered
        else "complete"
    )
    row("forward: FlopCounterMode", result.flop_counter_macs, fc_note)
    row("backward: rule (2 x forward)", result.backward_macs_rule, "stated rule")
    if backward:
        bw_note = result.backward_error or (
            "INCOMPLETE: " + ", ".join(f"{k} x{v}" for k, v in result.backward_uncovered.items())
            if result.backward_uncovered
            else "measured by FlopCounterMode"
        )
        row("backward: measured", result.backward_macs_measured, bw_note)
    console.print(table)
    zero = ", ".join(f"{k.split('::')[-1]} x{v}" for k, v in sorted(result.zero_ops.items())) or "(none)"
    console.print(
        f"[dim]counted as zero on purpose (elementwise, softmax, top-k, gathers, data movement): {zero}[/dim]"
    )
    by_op = ", ".join(f"{k} {v:,}" for k, v in sorted(result.by_op.items(), key=lambda kv: -kv[1])) or "(none)"
    console.print(f"MACs by op: {by_op}")
    if not result.complete:
        console.print(f"[bold red]incomplete count: no rule for {result.status().split(': ', 1)[1]}[/bold red]")
        raise typer.Exit(3)


if __name__ == "__main__":
    app()
