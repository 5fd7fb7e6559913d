"""The conversion commands: linen-to-nnx, nnx-to-linen, map and compare."""

from __future__ import annotations

import functools
import sys

import click

from ..errors import PlanError
from ._app import (
    EXIT_DIFFERENT,
    _emit,
    json_option,
    main,
    model_options,
    options,
    progress_bar,
    user_errors,
)


def _parse_renames(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        if "=" not in v:
            raise PlanError(f"--rename {v}: expected REGEX=REPLACEMENT")
        pattern, repl = v.split("=", 1)
        out.append((pattern, repl))
    return tuple(out)


def _load_target(spec: str):
    """Imports ``module:function`` and returns the target leaves of what it returns.

    The function returns an NNX model (concrete or abstract), its state, or a model adapter.
    """
    from ..convert import abstract_tree_leaves
    from ..models.adapter import call_factory

    target = call_factory(spec, "--target")
    if callable(getattr(target, "nnx_model", None)):
        target = target.nnx_model()
    return abstract_tree_leaves(target)


def _convert_options(f):
    for o in reversed([*_plan_options(), *_shard_options(), *_process_options()]):
        f = o(f)
    return f


def _shard_options():
    """The options that pre-shard the output for a mesh (as ``ckptconv reshard``)."""
    return [
        click.option(
            "--shard-for",
            "shard_for",
            default=None,
            metavar="MESH",
            help="Store each array with one chunk per device shard of this mesh, e.g. "
            "fsdp=4,tensor=2 (as ckptconv reshard writes it, in the same pass).",
        ),
        click.option(
            "--rules",
            "shard_rules",
            default="maxtext",
            show_default=True,
            help="--shard-for: logical axis rules, a preset name or rules file.",
        ),
        model_options,
        click.option(
            "--names",
            "names_file",
            default=None,
            metavar="FILE",
            help="--shard-for: YAML/JSON list of {match: REGEX, axes: [...]} matched against "
            "the output's paths (instead of --model-config or --model).",
        ),
        click.option(
            "--replicate-indivisible",
            is_flag=True,
            help="--shard-for: replicate dimensions not divisible by their mesh axes (listed).",
        ),
    ]


def _shard_for(shard_for, shard_rules, model_config, model_spec, names_file, replicate, procs):
    """The ``ShardFor`` of the --shard-for options, or ``None`` without --shard-for.

    ``procs`` is the number of processes (``None``: a multi-process run of unknown size, ``0``:
    one process, no --coordinator).

    Raises:
        PlanError: a --shard-for option without --shard-for, or several processes.
        ConfigError: both --names and a model, or neither.
    """
    given = [n for n, v in [("--model-config", model_config), ("--model", model_spec),
             ("--names", names_file), ("--replicate-indivisible", replicate)] if v]  # fmt: skip
    if shard_for is None:
        if given:
            raise PlanError(f"{given[0]} needs --shard-for MESH")
        return None
    if procs not in (0, 1):
        how = "--coordinator" if procs is None else f"--num-processes {procs}"
        raise PlanError(
            f"--shard-for converts in one process, not with {how} (convert with several "
            "processes, then ckptconv reshard)"
        )
    from ..sharding.leaf_names import resolve_names
    from ..sharding.reshard import ShardFor

    names = resolve_names(names_file, model_spec, model_config)
    return ShardFor(shard_for, names, shard_rules, replicate_indivisible=replicate)


def _plan_options():
    """The options of a conversion's plan, in ``--help`` order."""

    def scan_axis(kind, default):
        return click.option(
            f"--{kind.lower()}-scan-axis",
            type=int,
            default=None,
            help=f"Stacking axis of {kind} params (default: recorded, else {default}). Negative "
            "counts from the end of each stacked leaf, as numpy.moveaxis; out of range is refused.",
        )

    def flag(name, help, *decls):
        return click.option(name, *decls, is_flag=True, help=help)

    return [
        click.option(
            "--layout",
            type=click.Choice(["maxtext", "flax", "params", "nnx"]),
            default=None,
            help="Layout of the SOURCE (detected when omitted; refused if it contradicts "
            "detection). nnx-to-linen reads nnx: use --to to pick the Linen layout to write.",
        ),
        click.option(
            "--rename",
            "renames",
            multiple=True,
            metavar="REGEX=REPLACEMENT",
            help="Rename model paths ('/'-joined); repeatable.",
        ),
        click.option(
            "--scan-layers/--unscan-layers",
            default=None,
            help="Stack layers_{i} families into one scanned module, or split them.",
        ),
        scan_axis("Linen", 1),
        scan_axis("NNX", 0),
        click.option(
            "--dtype",
            default=None,
            help="Cast floating params to a floating dtype: bfloat16, float16, float32, float64.",
        ),
        flag("--params-only", "Keep the params only."),
        flag("--force", "Replace an existing destination."),
        flag("--dry-run", "Print the plan; write nothing."),
        click.option(
            "--mapping",
            default=None,
            metavar="FILE",
            help="A mapping file (YAML: rename, transpose, reshape, split, concat, stack, "
            "unstack, cast) applied to the model paths; recorded, so the reverse needs none.",
        ),
        click.option(
            "--target",
            default=None,
            metavar="MODULE:FUNCTION",
            help="Refuse to write unless the model fits this NNX model (or adapter) exactly.",
        ),
        flag("--json", "Print one JSON document.", "as_json"),
    ]


def _process_options():
    """The options of a multi-process conversion (``ckptconv launch`` sets them)."""

    def from_env(name, envvar, help, **kw):
        return click.option(name, envvar=envvar, show_envvar=True, default=None, help=help, **kw)

    return [
        from_env(
            "--coordinator",
            "JAX_COORDINATOR_ADDRESS",
            "Convert with several processes: process 0's jax.distributed address.",
            metavar="HOST:PORT",
        ),
        from_env(
            "--num-processes",
            "JAX_NUM_PROCESSES",
            "Number of processes converting together.",
            type=click.IntRange(1),
        ),
        from_env(
            "--process-id",
            "JAX_PROCESS_ID",
            "This process's index among them.",
            type=click.IntRange(0),
        ),
        click.option(
            "--barrier-timeout",
            type=click.FloatRange(min=1),
            default=300.0,
            show_default=True,
            help="Seconds a process waits for the others while none makes progress.",
        ),
    ]


def _run_convert(
    direction,
    src,
    dst,
    *,
    layout,
    renames,
    scan_layers,
    linen_scan_axis,
    nnx_scan_axis,
    dtype,
    params_only,
    force,
    dry_run,
    target,
    as_json,
    mapping=None,
    target_layout=None,
    coordinator=None,
    num_processes=None,
    process_id=None,
    barrier_timeout=300.0,
    output_format="ocdbt",
    shard_for=None,
    shard_rules="maxtext",
    model_config=None,
    model_spec=None,
    names_file=None,
    replicate_indivisible=False,
):
    from ..convert import ConvertOptions, convert
    from ..convert.mapping import load_mapping

    options = ConvertOptions(
        layout=layout,
        target_layout=target_layout,
        renames=_parse_renames(renames),
        scan_layers=scan_layers,
        linen_scan_axis=linen_scan_axis,
        nnx_scan_axis=nnx_scan_axis,
        dtype=dtype,
        params_only=params_only,
        mapping=load_mapping(mapping) if mapping else None,
    )
    multi = coordinator or num_processes is not None or process_id is not None
    shard = _shard_for(
        shard_for, shard_rules, model_config, model_spec, names_file, replicate_indivisible,
        num_processes if multi else 0,
    )  # fmt: skip
    target_leaves = _load_target(target) if target else None
    if dry_run:
        result = convert(
            src, None, direction=direction, options=options, target=target_leaves, shard_for=shard
        )
        _emit(result.plan.to_dict(), as_json, result.plan.describe())
        return
    run = functools.partial(convert, shard_for=shard) if shard is not None else convert
    if multi and shard is None:
        from ..convert.distributed import ProcessSettings, convert_in_processes

        settings = ProcessSettings(coordinator, num_processes, process_id, barrier_timeout)
        run = functools.partial(convert_in_processes, processes=settings)
    with progress_bar(direction, enabled=not as_json) as progress:
        result = run(
            src,
            dst,
            direction=direction,
            options=options,
            force=force,
            target=target_leaves,
            progress=progress,
            output_format=output_format,
        )
    d = result.to_dict()
    who = f"process {d['process_id']} of {d['num_processes']}: " if "process_id" in d else ""
    lines = [
        f"{who}wrote {d['destination']}: {d['leaves']} leaves, "
        f"{d['bytes'] / 1e6:.1f} MB in {d['seconds']:.2f} s "
        f"({d['source_layout']} -> {d['target_layout']}, peak RSS {d['peak_rss_mb']} MB)"
    ]
    if shard is not None:
        lines += _shard_lines(result.shardings)
    _emit(d, as_json, "\n".join(lines))


def _shard_lines(shardings) -> list[str]:
    """What --shard-for did, for the text output: the mesh and what it replicated."""
    mesh = ",".join(f"{k}={v}" for k, v in shardings.mesh.items())
    out = [f"sharded for mesh {mesh}: {len(shardings.leaves)} arrays"]
    out += [f"replicated (no logical names): {p}" for p in shardings.unnamed]
    out += [
        f"replicated (indivisible): {f.path} dim {f.dim} (size {f.size}) over {'+'.join(f.axes)}"
        for f in shardings.fallbacks
    ]
    return out


_format_option = click.option(
    "--format",
    "output_format",
    type=click.Choice(["ocdbt", "zarr"]),
    default="ocdbt",
    show_default=True,
    help="Output storage: one OCDBT database (Orbax's default), or one zarr folder per array "
    "(use_ocdbt=False, as Pathways needs).",
)


def _conversion_command(direction: str, doc: str, *extra):
    """Registers ``direction`` as a command over SRC DST with the conversion options."""

    def command(src: str, dst: str, **kw) -> None:
        _run_convert(direction, src, dst, **kw)

    command.__doc__ = doc
    decorate = options(
        main.command(direction),
        click.argument("src"),
        click.argument("dst"),
        _convert_options,
        _format_option,
        *extra,
        user_errors,
    )
    return decorate(command)


linen_to_nnx = _conversion_command(
    "linen-to-nnx",
    "Convert a Linen checkpoint (MaxText, Flax TrainState or a bare params tree) at SRC to "
    "NNX at DST.",
)
nnx_to_linen = _conversion_command(
    "nnx-to-linen",
    "Convert an NNX checkpoint at SRC back to a Linen layout at DST.",
    click.option(
        "--to",
        "target_layout",
        type=click.Choice(["maxtext", "flax", "params"]),
        default=None,
        help="Linen layout to WRITE (default: the one recorded at conversion, else maxtext).",
    ),
)


@main.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--atol", type=float, default=0.0, help="Absolute tolerance (0: bit-exact).")
@click.option("--rtol", type=float, default=0.0, help="Relative tolerance.")
@click.option("--mapping", default=None, metavar="FILE", help="View the Linen side through it.")
@json_option
@user_errors
def compare_cmd(a: str, b: str, atol: float, rtol: float, mapping, as_json: bool) -> None:
    """Compare checkpoints A and B leaf by leaf (across layouts); exit 1 if they differ."""
    from ..convert import compare
    from ..convert.mapping import load_mapping

    rules = load_mapping(mapping) if mapping else None
    result = compare(a, b, atol=atol, rtol=rtol, mapping=rules)
    bad = [d for d in result.leaves if not d.within_tolerance]
    lines = [
        f"{len(result.leaves)} leaves compared, {len(bad)} differ, "
        f"{len(result.only_in_a)} only in A, {len(result.only_in_b)} only in B: "
        + ("bit-exact" if result.bit_exact else "equal" if result.equal else "DIFFERENT")
    ]
    lines += [f"  differs: {d.path} max|diff|={d.max_abs_diff:g}" for d in bad]
    lines += [f"  only in A: {p}" for p in result.only_in_a]
    lines += [f"  only in B: {p}" for p in result.only_in_b]
    _emit(result.to_dict(), as_json, "\n".join(lines))
    if not result.equal:
        sys.exit(EXIT_DIFFERENT)


@main.command("map")
@click.argument("src")
@click.option(
    "--target",
    required=True,
    metavar="MODULE:FUNCTION",
    help="The NNX model to map onto: a function returning a model, its state or an adapter.",
)
@click.option("-o", "--output", default=None, metavar="FILE", help="Write the mapping file here.")
@click.option("--layout", default=None, help="The source's layout (default: detected).")
@json_option
@user_errors
def map_cmd(src: str, target: str, output: str | None, layout: str | None, as_json: bool):
    """Propose a mapping file from SRC's tree onto an NNX model; exit 1 unless complete.

    Prints a table of exact, inferred and ambiguous matches and of unmatched leaves on either
    side. Ambiguous choices are written as commented-out alternatives: uncomment one.
    """
    from ..convert.proposal import propose_for
    from ..models.adapter import call_factory

    proposal = propose_for(src, call_factory(target, "--target"), layout=layout)
    if output:
        with open(output, "w", encoding="utf-8") as f:  # an OSError is one line (user_errors)
            f.write(proposal.to_yaml())
    text = proposal.table() if output else proposal.table() + "\n\n" + proposal.to_yaml()
    _emit({**proposal.to_dict(), "output": output}, as_json, text)
    if not proposal.complete:
        sys.exit(EXIT_DIFFERENT)
