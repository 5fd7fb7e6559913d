"""Pre-shard a checkpoint for a mesh: every array's chunk grid becomes its device shard grid.

Each array leaf gets a ``PartitionSpec`` from logical axis names and rules
(:func:`~ckptconv.sharding.param_partition_specs`) and is rewritten with one stored chunk
per device shard (zarr3: the outer chunk of its ``sharding_indexed`` codec, holding inner
chunks of at most ``INNER_CHUNK_BYTES``, 2 MiB, that tile it), its ``_METADATA``
``write_shape`` the shard shape and its ``_sharding`` the Orbax JSON of that
``NamedSharding``. A device restoring its shard then reads whole chunks of its own.

The logical names come from an NNX model or from name rules
(:mod:`ckptconv.sharding.leaf_names`); leaves without names (rng state, counters, anything
unmatched) are replicated and listed.

The copy is streamed by the converter's machinery (:mod:`ckptconv.convert`): a plan whose
output leaves are the source leaves, a schedule told each leaf's chunk shape, the executor.
Arrays whose stored grid already is the shard grid are copied without decoding; the others
are read in slabs of whole target chunks of at most ``slab_bytes``. The output is written
into a temporary sibling and renamed into place; the source is only read.

A conversion pre-shards its output the same way in the same pass: ``convert(...,
shard_for=ShardFor(mesh, names))`` (:class:`ShardFor`; ``--shard-for`` on ``linen-to-nnx`` and
``nnx-to-linen``) gives the plan's output leaves their shardings from metadata alone
(:meth:`ShardFor.for_plan`), the schedule their chunk shapes and the writer their
``_sharding`` (:class:`OutputShardings`).

Limits: a device shard larger than ``slab_bytes`` is written by several slabs (TensorStore
then reads back and rewrites the chunk). The ``_sharding`` device ids are those of the first
devices of this process when it has enough for the mesh (as ``make_mesh`` lays them out),
else omitted (Orbax then lays ``jax.devices()`` out in the mesh shape when restoring without
a target). One process only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

from ..convert.execute import execute
from ..convert.expr import Src, permuted_source
from ..convert.layouts import OutLeaf
from ..convert.plan import Plan
from ..convert.run import check_paths, open_writer, peak_rss_bytes
from ..convert.schedule import DEFAULT_SLAB_BYTES, schedule, tile_shape
from ..errors import ShardingError
from ..io import CheckpointWriter, KeyPath, Leaf, Location, dtype_itemsize, keystr
from ..io.sources import CheckpointSource, open_source
from .annotate import Fallback, ShardingFallbackWarning, param_partition_specs
from .annotate import shard_shape as _shard_shape
from .cli_support import spec_to_json
from .leaf_names import leaf_names
from .mesh import make_mesh, parse_mesh_spec
from .presets import load_rules
from .rules import LogicalAxisRules

# The inner chunks of a zarr3 device shard: a reader of part of a shard decodes about this.
INNER_CHUNK_BYTES = 2 << 20


@dataclasses.dataclass(frozen=True)
class LeafSharding:
    """The sharding chosen for one array leaf.

    Attributes:
        path: the leaf's key path.
        shape: its global shape.
        names: its logical names, or ``None`` (unnamed: replicated).
        spec: its ``PartitionSpec``.
        shard_shape: one device's shard, the output's chunk shape.
    """

    path: KeyPath
    shape: tuple[int, ...]
    names: tuple[str | None, ...] | None
    spec: Any
    shard_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ReshardResult:
    """What :func:`reshard` did.

    Attributes:
        destination: where the output was written.
        mesh: the mesh's axis sizes.
        leaves: the sharding of every array leaf, in path order.
        fallbacks: dimensions replicated because they were indivisible.
        seconds: wall time of the write.
        bytes_written: array bytes written (decoded size).
        copied_leaves: arrays copied without decoding.
        peak_rss_bytes: the process's peak resident set size so far.
    """

    destination: str
    mesh: dict[str, int]
    leaves: tuple[LeafSharding, ...]
    fallbacks: tuple[Fallback, ...]
    seconds: float
    bytes_written: int
    copied_leaves: int
    peak_rss_bytes: int

    @property
    def unnamed(self) -> list[str]:
        """The '/'-joined paths of the arrays that had no logical names (replicated)."""
        return [keystr(s.path) for s in self.leaves if s.names is None]

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable summary (``--json``)."""
        return {
            "destination": self.destination,
            "mesh": self.mesh,
            "leaves": [
                {
                    "path": keystr(s.path),
                    "shape": list(s.shape),
                    "spec": spec_to_json(s.spec, len(s.shape)),
                    "shard_shape": list(s.shard_shape),
                }
                for s in self.leaves
            ],
            "unnamed": self.unnamed,
            "fallbacks": [
                {"path": f.path, "dim": f.dim, "size": f.size, "axes": list(f.axes)}
                for f in self.fallbacks
            ],
            "bytes": self.bytes_written,
            "seconds": round(self.seconds, 4),
            "copied_leaves": self.copied_leaves,
            "peak_rss_mb": round(self.peak_rss_bytes / 2**20, 1),
        }

    def lines(self) -> list[str]:
        """Returns the human-readable summary (the CLI's text output)."""
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        out = [
            f"wrote {self.destination}: {len(self.leaves)} arrays for mesh {mesh}, "
            f"{self.bytes_written / 1e6:.1f} MB in {self.seconds:.2f} s "
            f"({self.copied_leaves} copied, peak RSS {self.peak_rss_bytes / 2**20:.1f} MB)"
        ]
        out += [f"replicated (no logical names): {p}" for p in self.unnamed]
        out += [
            f"replicated (indivisible): {f.path} dim {f.dim} (size {f.size}) over "
            f"{'+'.join(f.axes)}"
            for f in self.fallbacks
        ]
        return out


def orbax_sharding(spec: Any, sizes: Mapping[str, int], device_ids: Any = None) -> dict:
    """The ``_sharding`` entry Orbax writes for ``NamedSharding(mesh, spec)``.

    Args:
        spec: the ``PartitionSpec``.
        sizes: the mesh's axis sizes, in mesh order.
        device_ids: the mesh's device ids as nested lists of the mesh shape; ``None`` omits
            ``device_mesh`` (Orbax then uses ``jax.devices()``).

    Returns:
        The JSON document (``NamedShardingMetadata.to_serialized_string``'s fields).
    """
    doc: dict[str, Any] = {
        "sharding_type": "NamedSharding",
        "shape": list(sizes.values()),
        "axis_names": list(sizes),
        "axis_types": ["AxisType.Auto"] * len(sizes),
        "partition_spec": spec_to_json(spec, len(tuple(spec))),
    }
    if device_ids is not None:
        doc["device_mesh"] = {"mesh": _tree_map_ids(device_ids)}
    return doc


def _tree_map_ids(ids: Any) -> Any:
    return [_tree_map_ids(i) for i in ids] if isinstance(ids, list) else {"id": int(ids)}


def _check_mesh_axes(rules: LogicalAxisRules, mesh: Any) -> None:
    """Refuses a mesh axis the rules do not know (a typo would silently replicate)."""
    known = rules.mesh_axes if rules.mesh_axes is not None else rules.used_mesh_axes()
    unknown = [a for a in mesh.shape if a not in known]
    if unknown:
        raise ShardingError(
            f"unknown mesh axis {unknown[0]!r}: the rules know mesh axes {list(known)}"
        )
    if rules.mesh_axes is None:
        rules.validate(mesh)


def plan_shardings(
    leaves: dict[KeyPath, Leaf],
    *,
    mesh: Any,
    rules: LogicalAxisRules,
    names: Any,
    replicate_indivisible: bool = False,
) -> tuple[list[LeafSharding], list[Fallback]]:
    """Chooses the sharding of every array leaf (metadata only; nothing is read).

    Args:
        leaves: the checkpoint's leaves; empty leaves are skipped.
        mesh: a ``Mesh`` or ``AbstractMesh``.
        rules: the logical axis rules.
        names: name rules (a list of ``(regex, axes)``), or a model adapter / abstract
            ``nnx.Module`` / ``nnx.State`` (see the module doc).
        replicate_indivisible: replicate indivisible dimensions (reported) instead of failing.

    Returns:
        The shardings in path order, and the replicated indivisible dimensions.

    Raises:
        ShardingError: an unknown mesh axis, names that do not fit a leaf's rank, a model
            that does not fit the checkpoint, or an indivisible dimension (naming the path,
            dimension, size and mesh axes).
    """
    import jax
    from flax import nnx, traverse_util

    _check_mesh_axes(rules, mesh)
    arrays = {p: leaf for p, leaf in sorted(leaves.items()) if not leaf.empty}
    found = leaf_names(arrays, names)
    with nnx.use_eager_sharding(False):
        state = nnx.State(
            traverse_util.unflatten_dict(
                {
                    p: nnx.Param(jax.ShapeDtypeStruct(arrays[p].shape, "float32"), out_sharding=n)
                    for p, n in found.items()
                    if n is not None
                }
            )
        )
    report: list[Fallback] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardingFallbackWarning)
        specs = param_partition_specs(
            state, rules, mesh, replicate_indivisible=replicate_indivisible, report=report
        )
    flat = {tuple(str(k) for k in p): s for p, s in traverse_util.flatten_dict(specs).items()}
    out = []
    for path, leaf in arrays.items():
        spec = flat.get(path, jax.sharding.PartitionSpec())
        shard = _shard_shape(leaf.shape, spec, mesh)  # type: ignore[arg-type]
        out.append(LeafSharding(path, leaf.shape, found[path], spec, shard))  # type: ignore[arg-type]
    return out, report


def _meshes(mesh: str | Mapping[str, int]) -> tuple[Any, dict[str, int], Any]:
    """``(abstract mesh, sizes, device ids or None)`` for a mesh spec."""
    import jax
    import numpy as np

    sizes = parse_mesh_spec(mesh)
    concrete = None
    if -1 in sizes.values():
        concrete = make_mesh(sizes)
    elif math.prod(sizes.values()) <= jax.device_count():
        concrete = make_mesh(sizes, devices=jax.devices()[: math.prod(sizes.values())])
    if concrete is not None:
        sizes = dict(concrete.shape)
    abstract = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    ids = None if concrete is None else np.vectorize(lambda d: d.id)(concrete.devices).tolist()
    return abstract, sizes, ids


class _WithShardings:
    """A writer that records each array's sharding (``_sharding``) as it is declared.

    zarr3 arrays it creates hold inner chunks of at most ``INNER_CHUNK_BYTES`` in each
    stored chunk (one device shard), which they tile exactly.
    """

    def __init__(
        self, writer: CheckpointWriter, shardings: Mapping[KeyPath, dict], zarr3: bool
    ) -> None:
        self._writer = writer
        self._shardings = shardings
        self._zarr3 = zarr3

    def create(self, path, shape, dtype, *, chunk_shape, **kwargs):  # noqa: D102
        inner = None
        if self._zarr3:
            inner = tile_shape(tuple(chunk_shape), dtype_itemsize(dtype), INNER_CHUNK_BYTES)
        return self._writer.create(
            path,
            shape,
            dtype,
            sharding=self._shardings[tuple(path)],
            chunk_shape=chunk_shape,
            inner_chunk_shape=inner,
            **kwargs,
        )

    def copy_array(self, path, *args, **kwargs):  # noqa: D102
        sharding = self._shardings[tuple(path)]
        return self._writer.copy_array(path, *args, sharding=sharding, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


def _copy_keeps_write_shape(writer: CheckpointWriter, chunks: Mapping[KeyPath, tuple]):
    """``can_copy`` that also wants the source's ``write_shape`` to be the target chunk."""

    def can_copy(source, path, axes):
        write_shape = getattr(source, "write_shape", lambda p: None)(path)
        if write_shape not in (None, chunks[tuple(path)]):
            return False
        return writer.can_copy(source, path, axes)

    return can_copy


def _write(
    source: CheckpointSource,
    writer: CheckpointWriter,
    shardings: list[LeafSharding],
    *,
    sizes: dict[str, int],
    ids: Any,
    slab_bytes: int,
    progress: Any,
):
    """Writes every leaf of ``source`` with its chunk grid and ``_sharding``."""
    key_types = getattr(source, "key_types", lambda p: None)
    value_type = getattr(source, "value_type", lambda p: "None")
    leaves = source.leaves()
    out = [
        OutLeaf(s.path, Src(s.path, s.shape, leaves[s.path].dtype), key_types(s.path))  # type: ignore[arg-type]
        for s in shardings
    ]
    chunks = {s.path: tuple(max(1, c) for c in s.shard_shape) for s in shardings}
    plan = Plan("reshard", source.format_name, source.format_name, out, source.custom_metadata)
    tasks = schedule(
        plan,
        source,
        can_copy=_copy_keeps_write_shape(writer, chunks),
        slab_bytes=slab_bytes,
        chunks=chunks,
    )
    writer.clone_for(source, [t.source[0].path for t in tasks if t.source is not None])
    for path, leaf in sorted(leaves.items()):
        if leaf.empty:  # kept with their value type (None, Dict or List)
            writer.write_empty(path, key_types=key_types(path), value_type=value_type(path))
    docs = {s.path: orbax_sharding(s.spec, sizes, ids) for s in shardings}
    return execute(tasks, source, _WithShardings(writer, docs, source.use_zarr3), progress=progress)


@dataclasses.dataclass(frozen=True)
class OutputShardings:
    """The shardings of a conversion's output leaves, and how to write them.

    Attributes:
        leaves: the sharding of every array leaf, in path order.
        fallbacks: dimensions replicated because they were indivisible.
        mesh: the mesh's axis sizes.
        device_ids: the mesh's device ids (nested lists), or ``None``.
        zarr3: whether the output is zarr3 (its stored chunks then hold inner chunks).
    """

    leaves: tuple[LeafSharding, ...]
    fallbacks: tuple[Fallback, ...]
    mesh: dict[str, int]
    device_ids: Any
    zarr3: bool

    @property
    def chunks(self) -> dict[KeyPath, tuple[int, ...]]:
        """Each array's stored chunk shape: one device shard (the schedule's ``chunks``)."""
        return {s.path: tuple(max(1, c) for c in s.shard_shape) for s in self.leaves}

    @property
    def unnamed(self) -> list[str]:
        """The '/'-joined paths of the arrays that had no logical names (replicated)."""
        return [keystr(s.path) for s in self.leaves if s.names is None]

    def wrap(self, writer: CheckpointWriter) -> Any:
        """``writer`` declaring each array with its ``_sharding`` and (zarr3) inner chunks."""
        docs = {s.path: orbax_sharding(s.spec, self.mesh, self.device_ids) for s in self.leaves}
        return _WithShardings(writer, docs, self.zarr3)

    def can_copy(self, writer: CheckpointWriter, plan: Plan):
        """``writer.can_copy`` that also wants a copied array's ``write_shape`` on the grid."""
        chunks = self.chunks
        wanted = {}
        for out in plan.leaves:
            found = None if out.expr is None else permuted_source(out.expr)
            if found is not None and out.path in chunks:
                wanted[(tuple(found[0].path), tuple(found[1]))] = chunks[out.path]

        def can_copy(source, path, axes):
            write_shape = getattr(source, "write_shape", lambda p: None)(path)
            key = (tuple(path), tuple(axes))
            if write_shape is not None and (
                key not in wanted or tuple(write_shape[a] for a in axes) != wanted[key]
            ):
                return False
            return writer.can_copy(source, path, axes)

        return can_copy

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable summary (a conversion's ``--json``)."""
        return {
            "mesh": self.mesh,
            "unnamed": self.unnamed,
            "fallbacks": [
                {"path": f.path, "dim": f.dim, "size": f.size, "axes": list(f.axes)}
                for f in self.fallbacks
            ],
        }


@dataclasses.dataclass(frozen=True)
class ShardFor:
    """Pre-shard a conversion's output for a mesh (``convert(..., shard_for=...)``).

    Attributes:
        mesh: axis sizes, ``"fsdp=4,tensor=2"`` or a dict; one may be ``-1`` (real devices).
        names: where logical names come from: name rules (``(regex, axes)`` pairs, matched
            against the output's paths), or a model adapter / abstract ``nnx.Module`` /
            ``nnx.State``. A model names the NNX side: the output's ``model/<path>/value``
            leaves (``linen-to-nnx``), or the source's (``nnx-to-linen``), whose names an
            output array copied or axis-permuted from such a leaf takes with it (others are
            replicated and listed).
        rules: a preset name, a rules file or the rules.
        replicate_indivisible: replicate indivisible dimensions (reported) instead of failing.
    """

    mesh: str | Mapping[str, int]
    names: Any
    rules: str | LogicalAxisRules = "maxtext"
    replicate_indivisible: bool = False

    def for_plan(self, plan: Plan, source: CheckpointSource) -> OutputShardings:
        """The shardings of ``plan``'s output leaves (metadata only; nothing is read).

        Raises:
            ShardingError: as :func:`plan_shardings`.
        """
        abstract, sizes, ids = _meshes(self.mesh)
        rules = self.rules
        if not isinstance(rules, LogicalAxisRules):
            rules = load_rules(rules)
        names = self.names
        if not isinstance(names, list | tuple | dict) and plan.direction == "nnx-to-linen":
            names = names_through_plan(plan, source, names)
        shardings, fallbacks = plan_shardings(
            plan.output_leaves(),
            mesh=abstract,
            rules=rules,
            names=names,
            replicate_indivisible=self.replicate_indivisible,
        )
        return OutputShardings(tuple(shardings), tuple(fallbacks), sizes, ids, source.use_zarr3)


def names_through_plan(plan: Plan, source: CheckpointSource, model: Any) -> dict:
    """Exact names of ``plan``'s output arrays from a model naming the source's leaves.

    An output array that is a source array as stored or with its axes permuted gets the
    source's names, permuted; the others get none.

    Returns:
        ``{output path: axes}`` of every named output array.
    """
    arrays = {p: leaf for p, leaf in source.leaves().items() if not leaf.empty}
    found = leaf_names(arrays, model)
    out = {}
    for leaf in plan.leaves:
        src = None if leaf.expr is None else permuted_source(leaf.expr)
        if src is not None and found.get(tuple(src[0].path)) is not None:
            axes = found[tuple(src[0].path)]
            out[leaf.path] = tuple(axes[a] for a in src[1])
    return out


def reshard(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    mesh: str | Mapping[str, int],
    rules: str | LogicalAxisRules = "maxtext",
    names: Any,
    force: bool = False,
    replicate_indivisible: bool = False,
    progress: Any = None,
    slab_bytes: int | None = None,
) -> ReshardResult:
    """Rewrites the checkpoint ``src`` at ``dst`` with one chunk per device shard of ``mesh``.

    Example:
        >>> reshard("nnx_ckpt", "nnx_fsdp4_tp2", mesh="fsdp=4,tensor=2",
        ...         names=get_adapter("default", ModelConfig.load("cfg.json")))  # doctest: +SKIP

    Args:
        src: the source checkpoint (never modified).
        dst: the destination.
        mesh: axis sizes, ``"fsdp=4,tensor=2"`` or a dict; one may be ``-1`` (real devices).
        rules: a preset name, a rules file or the rules.
        names: where logical names come from: name rules (a list of ``(regex, axes)``, see
            :func:`load_name_rules`), a model adapter, or an abstract ``nnx.Module`` /
            ``nnx.State``.
        force: replace an existing destination.
        replicate_indivisible: replicate dimensions their mesh axes do not divide (listed in
            the result) instead of failing.
        progress: called after each array with (bytes done, bytes total, leaf path).
        slab_bytes: the largest slab held at once (default: the converter's).

    Returns:
        What was written, with every array's sharding.

    Raises:
        CkptconvError: bad input (see :func:`plan_shardings`); nothing is written.
    """
    abstract, sizes, ids = _meshes(mesh)
    axis_rules = load_rules(rules) if not isinstance(rules, LogicalAxisRules) else rules
    source = open_source(src)
    shardings, fallbacks = plan_shardings(
        source.leaves(),
        mesh=abstract,
        rules=axis_rules,
        names=names,
        replicate_indivisible=replicate_indivisible,
    )
    dst_loc = Location.parse(dst)
    check_paths(source.location, dst_loc)
    start = time.perf_counter()
    use_ocdbt = source.format_name != "zarr"
    with open_writer(
        source, dst_loc, source.custom_metadata, force=force, use_ocdbt=use_ocdbt
    ) as writer:
        done = _write(
            source,
            writer,
            shardings,
            sizes=sizes,
            ids=ids,
            slab_bytes=slab_bytes or DEFAULT_SLAB_BYTES,
            progress=progress,
        )
    return ReshardResult(
        str(dst_loc),
        sizes,
        tuple(shardings),
        tuple(fallbacks),
        time.perf_counter() - start,
        done.nbytes,
        done.copied_leaves,
        peak_rss_bytes(),
    )
