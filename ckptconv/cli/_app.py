"""The ``ckptconv`` group, its one-line user errors and its ``--json`` output.

User errors (:class:`~ckptconv.errors.CkptconvError`) print one line on stderr and exit 2;
``compare`` exits 1 when the checkpoints differ. ``--json`` prints one JSON document on
stdout; progress bars go to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys

import click

from ..errors import CkptconvError

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
            from ..io import describe_os_error

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
        from ..io import configure_s3

        configure_s3(endpoint=s3_endpoint)


def options(*decorators):
    """Composes click option decorators into one (applied in the order given)."""

    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
model_options = options(
    click.option(
        "--model-config", "model_config", default=None, help="ModelConfig JSON/YAML file."
    ),
    click.option("--model", "model_spec", default=None, help="Model adapter, module:function."),
)


@contextlib.contextmanager
def progress_bar(label: str, *, enabled: bool):
    """Yields ``progress(done, total, path)`` drawing a bar on stderr (a terminal only).

    The bar starts at the first call, when the total is known, and is closed on exit.
    """
    state: dict = {"bar": None, "done": 0}
    show = enabled and sys.stderr.isatty()

    def progress(done: int, total: int, path: str) -> None:
        if not show:
            return
        if state["bar"] is None:
            state["bar"] = click.progressbar(length=max(total, 1), label=label, file=sys.stderr)
            state["bar"].__enter__()
        state["bar"].update(done - state["done"])
        state["done"] = done

    try:
        yield progress
    finally:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
