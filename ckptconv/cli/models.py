"""The model commands: annotate, decode and verify."""

from __future__ import annotations

import sys

import click

from ._app import EXIT_DIFFERENT, _emit, json_option, main, model_options, options, user_errors


def _prompt_options(*, required: bool, prompt: str, steps: str):
    """``--prompt-ids`` and ``--max-new-tokens`` of the commands that decode."""
    return options(
        click.option("--prompt-ids", "prompt_ids", required=required, default=None, help=prompt),
        click.option("--max-new-tokens", type=int, default=8, show_default=True, help=steps),
    )


@main.command("annotate")
@model_options
@click.option("--mesh", "mesh_spec", required=True, help="Mesh axes, e.g. data=2,tensor=4.")
@click.option("--rules", default="maxtext", show_default=True, help="Preset name or rules file.")
@click.option(
    "--mode",
    type=click.Choice(["params", "prefill", "ar"]),
    default="params",
    show_default=True,
    help="Params, or the KV cache in prefill or autoregressive mode.",
)
@click.option(
    "--cache-batch",
    type=int,
    default=None,
    help="KV-cache rows (default: 1 for prefill, the device count for ar).",
)
@click.option(
    "--replicate-indivisible",
    is_flag=True,
    help="Replicate dimensions not divisible by their mesh axes (each is reported).",
)
@json_option
@user_errors
def annotate_cmd(
    model_config, model_spec, mesh_spec, rules, mode, cache_batch, replicate_indivisible, as_json
) -> None:
    """Print each variable's logical names, PartitionSpec and per-device shard shape."""
    from jax.sharding import PartitionSpec

    from ..models.adapter import resolve_model
    from ..sharding.cli_support import annotate_model

    rows, fallbacks = annotate_model(
        resolve_model(model_spec, model_config),
        mesh_spec,
        rules,
        mode,
        cache_batch=cache_batch,
        replicate_indivisible=replicate_indivisible,
    )
    doc = {"mesh": mesh_spec, "rules": rules, "mode": mode, "rows": rows, "fallbacks": fallbacks}
    # The JSON is structured (see spec_to_json); the text keeps PartitionSpec's own P(...).
    lines = [
        f"{r['path']}  {r['shape']}  {r['logical_names']}  "
        f"{PartitionSpec(*(tuple(e) if isinstance(e, list) else e for e in r['spec']))!r}  "
        f"-> {r['shard_shape']}"
        for r in rows
    ]
    lines += [
        f"replicated (indivisible): {f['path']} dim {f['dim']} (size {f['size']}) "
        f"over {'+'.join(f['axes'])}"
        for f in fallbacks
    ]
    _emit(doc, as_json, "\n".join(lines))


@main.command("decode")
@click.argument("ckpt")
@model_options
@_prompt_options(required=True, prompt="Token ids, e.g. 1,7,42.", steps="Tokens to generate.")
@click.option("--mesh", "mesh_spec", default=None, help="Mesh axes, e.g. data=2,tensor=4.")
@click.option(
    "--sampler",
    default="greedy",
    show_default=True,
    help="greedy, temperature, topk:K or topp:P.",
)
@click.option("--temperature", type=float, default=None, help="Sampling temperature (1.0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the samplers.")
@click.option(
    "--logits-out",
    "logits_out",
    default=None,
    help="Save float32 logits [N, vocab] to this .npy file.",
)
@json_option
@user_errors
def decode_cmd(
    ckpt,
    model_config,
    model_spec,
    prompt_ids,
    max_new_tokens,
    mesh_spec,
    sampler,
    temperature,
    seed,
    logits_out,
    as_json,
) -> None:
    """Decode a prompt from CKPT (NNX, or Linen converted in memory) with the NNX engine."""
    from ..engine import decode_checkpoint, parse_prompt_ids, parse_sampler
    from ..models.adapter import resolve_model

    result = decode_checkpoint(
        ckpt,
        resolve_model(model_spec, model_config),
        parse_prompt_ids(prompt_ids),
        max_new_tokens=max_new_tokens,
        mesh=mesh_spec,
        sampler=parse_sampler(sampler, temperature),
        seed=seed,
    )
    if logits_out:
        result.save_logits(logits_out)
    doc = {**result.to_dict(), "logits_out": logits_out}
    _emit(doc, as_json, " ".join(str(t) for t in result.generated_ids))


@main.command("verify")
@click.argument("linen_ckpt")
@click.argument("nnx_ckpt")
@model_options
@_prompt_options(
    required=False, prompt="Token ids (default: 8 fixed).", steps="Greedy steps to compare."
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Decode-check logit tolerance (default: 32 eps of the activation dtype x the logit "
    "scale). The weights check is always float32-tight.",
)
@click.option(
    "--mapping",
    default=None,
    metavar="FILE",
    help="Also check the NNX leaves bit-exact against the Linen ones through this mapping.",
)
@json_option
@user_errors
def verify_cmd(
    linen_ckpt,
    nnx_ckpt,
    model_config,
    model_spec,
    prompt_ids,
    max_new_tokens,
    atol,
    mapping,
    as_json,
):
    """Check NNX_CKPT against LINEN_CKPT by decoding; exit 1 if either check fails.

    Weights check: Linen and NNX full forward passes on the same tokens (exact up to float32
    noise). Decode check: the engine's KV-cached greedy decode against the NNX full forward,
    within a tolerance set by the activation dtype (or --atol).
    """
    from ..convert.mapping import load_mapping
    from ..engine import parse_prompt_ids, verify
    from ..models.adapter import resolve_model

    result = verify(
        linen_ckpt,
        nnx_ckpt,
        resolve_model(model_spec, model_config),
        prompt_ids=None if prompt_ids is None else parse_prompt_ids(prompt_ids),
        max_new_tokens=max_new_tokens,
        atol=atol,
        mapping=load_mapping(mapping) if mapping else None,
    )
    _emit(result.to_dict(), as_json, "\n".join(result.lines()))
    if not result.ok:
        sys.exit(EXIT_DIFFERENT)
