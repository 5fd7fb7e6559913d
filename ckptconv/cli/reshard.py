"""The ``reshard`` command: pre-shard a checkpoint's chunk grids for a device mesh."""

from __future__ import annotations

import click

from ._app import _emit, json_option, main, model_options, progress_bar, user_errors


@main.command("reshard")
@click.argument("src")
@click.argument("dst")
@click.option("--mesh", "mesh_spec", required=True, help="Mesh axes, e.g. fsdp=4,tensor=2.")
@click.option("--rules", default="maxtext", show_default=True, help="Preset name or rules file.")
@model_options
@click.option(
    "--names",
    "names_file",
    default=None,
    metavar="FILE",
    help="YAML/JSON list of {match: REGEX, axes: [name or null, ...]} (instead of a model).",
)
@click.option(
    "--replicate-indivisible",
    is_flag=True,
    help="Replicate dimensions not divisible by their mesh axes (each is reported).",
)
@click.option("--force", is_flag=True, help="Replace an existing destination.")
@json_option
@user_errors
def reshard_cmd(
    src,
    dst,
    mesh_spec,
    rules,
    model_config,
    model_spec,
    names_file,
    replicate_indivisible,
    force,
    as_json,
) -> None:
    """Rewrite SRC at DST with one stored chunk per device shard of --mesh.

    Logical names come from the model (--model-config or --model; an NNX checkpoint's
    model/<param>/value leaves, and optimizer leaves of the same shape) or from --names.
    Arrays without names are replicated and listed.
    """
    from ..sharding.leaf_names import resolve_names
    from ..sharding.reshard import reshard

    names = resolve_names(names_file, model_spec, model_config)
    with progress_bar("reshard", enabled=not as_json) as progress:
        result = reshard(
            src,
            dst,
            mesh=mesh_spec,
            rules=rules,
            names=names,
            force=force,
            replicate_indivisible=replicate_indivisible,
            progress=progress,
        )
    _emit(result.to_dict(), as_json, "\n".join(result.lines()))
