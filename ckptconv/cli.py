"""The ``ckptconv`` command: option parsing only, one library call per command.

User errors (:class:`~ckptconv.errors.CkptconvError`) print one line on stderr and exit 2;
``compare`` exits 1 when the checkpoints differ. ``--json`` prints one JSON document on
stdout; progress bars go to stderr.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys

import click

from .errors import CkptconvError, PlanError

EXIT_DIFFERENT = 1
EXIT_USER_ERROR = 2


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def user_errors(fn):
    """Turns :class:`CkptconvError` (and any OS error) into a one-line message and exit 2.

    An error may carry its own ``exit_code`` (3: this process of a multi-process conversion
    stopped because another one failed).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CkptconvError as e:
            click.echo(f"ckptconv: error: {_one_line(str(e))}", err=True)
            sys.exit(getattr(e, "exit_code", EXIT_USER_ERROR))
        except OSError as e:
            # The library raises OS failures as StorageError; this is the net for any that
            # still escapes (a path, a full disk): one line naming the path, never a traceback.
            from .io import describe_os_error

            click.echo(f"ckptconv: error: {_one_line(describe_os_error(e))}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def _emit(obj: dict, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=1, default=str))
    else:
        click.echo(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptconv")
@click.option(
    "--s3-endpoint",
    metavar="URL",
    default=None,
    help="S3-compatible server for s3:// locations (default: AWS_ENDPOINT_URL_S3, "
    "AWS_ENDPOINT_URL, else AWS).",
)
@user_errors
def main(s3_endpoint: str | None) -> None:
    """Convert Flax Linen checkpoints to Flax NNX and back, bit-exactly.

    Checkpoints are local paths or TensorStore URLs: file://, s3://BUCKET/PREFIX,
    gs://BUCKET/PREFIX. S3 credentials and region come from the AWS environment variables
    and files.
    """
    if s3_endpoint:
        from .io import configure_s3

        configure_s3(endpoint=s3_endpoint)


def _parse_renames(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        if "=" not in v:
            raise PlanError(f"--rename {v}: expected REGEX=REPLACEMENT")
        pattern, repl = v.split("=", 1)
        out.append((pattern, repl))
    return tuple(out)


def _load_target(spec: str):
    """Imports ``module:function`` and returns the target leaves of what it returns."""
    from .convert import abstract_tree_leaves

    if ":" not in spec:
        raise PlanError(f"--target {spec}: expected module:function")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise PlanError(f"--target {spec}: cannot import it ({e})") from e
    return abstract_tree_leaves(fn())


def _convert_options(f):
    for o in reversed([*_plan_options(), *_process_options()]):
        f = o(f)
    return f


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
            "--target",
            default=None,
            metavar="MODULE:FUNCTION",
            help="Check the plan against an NNX model (or its abstract state).",
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
    target_layout=None,
    coordinator=None,
    num_processes=None,
    process_id=None,
    barrier_timeout=300.0,
    output_format="ocdbt",
):
    from .convert import ConvertOptions, convert

    options = ConvertOptions(
        layout=layout,
        target_layout=target_layout,
        renames=_parse_renames(renames),
        scan_layers=scan_layers,
        linen_scan_axis=linen_scan_axis,
        nnx_scan_axis=nnx_scan_axis,
        dtype=dtype,
        params_only=params_only,
    )
    target_leaves = _load_target(target) if target else None
    if dry_run:
        result = convert(src, None, direction=direction, options=options, target=target_leaves)
        _emit(result.plan.to_dict(), as_json, result.plan.describe())
        return
    show_bar = not as_json and sys.stderr.isatty()
    bar = None
    state = {"done": 0}

    def progress(done: int, total: int, path: str) -> None:
        nonlocal bar
        if not show_bar:
            return
        if bar is None:
            bar = click.progressbar(length=max(total, 1), label=direction, file=sys.stderr)
            bar.__enter__()
        bar.update(done - state["done"])
        state["done"] = done

    run = convert
    if coordinator or num_processes is not None or process_id is not None:
        from .convert.distributed import ProcessSettings, convert_in_processes

        settings = ProcessSettings(coordinator, num_processes, process_id, barrier_timeout)
        run = functools.partial(convert_in_processes, processes=settings)
    try:
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
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    d = result.to_dict()
    who = f"process {d['process_id']} of {d['num_processes']}: " if "process_id" in d else ""
    _emit(
        d,
        as_json,
        f"{who}wrote {d['destination']}: {d['leaves']} leaves, "
        f"{d['bytes'] / 1e6:.1f} MB in {d['seconds']:.2f} s "
        f"({d['source_layout']} -> {d['target_layout']}, peak RSS {d['peak_rss_mb']} MB)",
    )


_format_option = click.option(
    "--format",
    "output_format",
    type=click.Choice(["ocdbt", "zarr"]),
    default="ocdbt",
    show_default=True,
    help="Output storage: one OCDBT database (Orbax's default), or one zarr folder per array "
    "(use_ocdbt=False, as Pathways needs).",
)


@main.command("linen-to-nnx")
@click.argument("src")
@click.argument("dst")
@_convert_options
@_format_option
@user_errors
def linen_to_nnx(src: str, dst: str, **kw) -> None:
    """Convert a Linen checkpoint (MaxText or Flax TrainState) at SRC to NNX at DST."""
    _run_convert("linen-to-nnx", src, dst, **kw)


@main.command("nnx-to-linen")
@click.argument("src")
@click.argument("dst")
@_convert_options
@_format_option
@click.option(
    "--to",
    "target_layout",
    type=click.Choice(["maxtext", "flax", "params"]),
    default=None,
    help="Linen layout to WRITE (default: the one recorded at conversion, else maxtext).",
)
@user_errors
def nnx_to_linen(src: str, dst: str, **kw) -> None:
    """Convert an NNX checkpoint at SRC back to a Linen layout at DST."""
    _run_convert("nnx-to-linen", src, dst, **kw)


@main.command("inspect")
@click.argument("ckpt")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@user_errors
def inspect_cmd(ckpt: str, as_json: bool) -> None:
    """List the layout, keys, shapes, dtypes and bytes of CKPT (metadata only)."""
    from .convert import detect_layout
    from .io import keystr
    from .io.sources import open_source

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


@main.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--atol", type=float, default=0.0, help="Absolute tolerance (0: bit-exact).")
@click.option("--rtol", type=float, default=0.0, help="Relative tolerance.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@user_errors
def compare_cmd(a: str, b: str, atol: float, rtol: float, as_json: bool) -> None:
    """Compare checkpoints A and B leaf by leaf (across layouts); exit 1 if they differ."""
    from .convert import compare

    result = compare(a, b, atol=atol, rtol=rtol)
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


@main.command("demo")
@click.option("--workdir", default=None, help="Keep the checkpoints here (default: a temp folder).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@user_errors
def demo_cmd(workdir: str | None, as_json: bool) -> None:
    """Train, save, convert, restore into NNX, compare logits, convert back, compare bytes."""
    from .demo import run_demo

    result = run_demo(workdir, say=(lambda s: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))


@main.command("annotate")
@click.option("--model-config", "model_config", default=None, help="ModelConfig JSON/YAML file.")
@click.option("--model", "model_spec", default=None, help="Model adapter, module:function.")
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@user_errors
def annotate_cmd(
    model_config, model_spec, mesh_spec, rules, mode, cache_batch, replicate_indivisible, as_json
) -> None:
    """Print each variable's logical names, PartitionSpec and per-device shard shape."""
    from jax.sharding import PartitionSpec

    from .models.adapter import resolve_model
    from .sharding.cli_support import annotate_model

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
@click.option("--model-config", "model_config", default=None, help="ModelConfig JSON/YAML file.")
@click.option("--model", "model_spec", default=None, help="Model adapter, module:function.")
@click.option("--prompt-ids", "prompt_ids", required=True, help="Token ids, e.g. 1,7,42.")
@click.option(
    "--max-new-tokens", type=int, default=8, show_default=True, help="Tokens to generate."
)
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
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
    from .engine import decode_checkpoint, parse_prompt_ids, parse_sampler
    from .models.adapter import resolve_model

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
@click.option("--model-config", "model_config", default=None, help="ModelConfig JSON/YAML file.")
@click.option("--model", "model_spec", default=None, help="Model adapter, module:function.")
@click.option("--prompt-ids", "prompt_ids", default=None, help="Token ids (default: 8 fixed).")
@click.option(
    "--max-new-tokens", type=int, default=8, show_default=True, help="Greedy steps to compare."
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Decode-check logit tolerance (default: 32 eps of the activation dtype x the logit "
    "scale). The weights check is always float32-tight.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@user_errors
def verify_cmd(
    linen_ckpt, nnx_ckpt, model_config, model_spec, prompt_ids, max_new_tokens, atol, as_json
):
    """Check NNX_CKPT against LINEN_CKPT by decoding; exit 1 if either check fails.

    Weights check: Linen and NNX full forward passes on the same tokens (exact up to float32
    noise). Decode check: the engine's KV-cached greedy decode against the NNX full forward,
    within a tolerance set by the activation dtype (or --atol).
    """
    from .engine import parse_prompt_ids, verify
    from .models.adapter import resolve_model

    result = verify(
        linen_ckpt,
        nnx_ckpt,
        resolve_model(model_spec, model_config),
        prompt_ids=None if prompt_ids is None else parse_prompt_ids(prompt_ids),
        max_new_tokens=max_new_tokens,
        atol=atol,
    )
    _emit(result.to_dict(), as_json, "\n".join(result.lines()))
    if not result.ok:
        sys.exit(EXIT_DIFFERENT)


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
    from .convert.launch import launch

    sys.exit(launch(num_processes, list(command)))


if __name__ == "__main__":
    main()
