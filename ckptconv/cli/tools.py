"""The other commands: inspect, demo and launch."""

from __future__ import annotations

import json
import sys

import click

from ..errors import CkptconvError
from ._app import _emit, json_option, main, user_errors


@main.command("inspect")
@click.argument("ckpt")
@json_option
@user_errors
def inspect_cmd(ckpt: str, as_json: bool) -> None:
    """List the layout, keys, shapes, dtypes and bytes of CKPT (metadata only)."""
    from ..convert import detect_layout
    from ..io import keystr
    from ..io.sources import open_source

    reader = open_source(ckpt)
    leaves = reader.leaves()
    try:
        layout = detect_layout(leaves, str(reader.location)).name
    except CkptconvError:
        layout = "unknown"
    rows = [
        {
            "path": keystr(p),
            "shape": None if x.empty else list(x.shape),
            "dtype": x.dtype,
            "bytes": x.nbytes,
        }
        for p, x in sorted(leaves.items())
    ]
    total = sum(r["bytes"] for r in rows)
    doc = {
        "location": str(reader.location),
        "format": reader.format_name,
        "layout": layout,
        "bytes": total,
        "leaves": rows,
    }
    lines = [
        f"{reader.location}: {reader.format_name} format, layout {layout}, {len(rows)} leaves, "
        f"{total / 1e6:.2f} MB"
    ]
    for r in rows:
        shape = "<empty>" if r["shape"] is None else f"{r['dtype']}{r['shape']}"
        lines.append(f"  {r['path']}  {shape}  {r['bytes']}")
    _emit(doc, as_json, "\n".join(lines))


@main.command("demo")
@click.option("--workdir", default=None, help="Keep the checkpoints here (default: a temp folder).")
@json_option
@user_errors
def demo_cmd(workdir: str | None, as_json: bool) -> None:
    """Train, save, convert, restore into NNX, compare logits, convert back, compare bytes."""
    from ..demo import run_demo

    result = run_demo(workdir, say=(lambda s: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))


@main.command(
    "launch",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "-n",
    "--num-processes",
    type=click.IntRange(1),
    required=True,
    help="Number of local processes to start.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@user_errors
def launch_cmd(num_processes: int, command: tuple[str, ...]) -> None:
    """Run one conversion in N local processes: launch -n 4 -- linen-to-nnx SRC DST [...]."""
    from ..convert.launch import launch

    sys.exit(launch(num_processes, list(command)))
