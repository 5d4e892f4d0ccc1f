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


if __name__ == "__main__":
    app()
