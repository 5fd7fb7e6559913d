"""Logical axis rules: map an array's logical dimension names to mesh axes.

The semantics are exactly those of :func:`flax.linen.logical_to_mesh_axes` (the reference;
the parity is tested with hypothesis): rules are an ordered list of ``(logical name, mesh
axes)``; they are visited in order and a rule assigns its mesh axes to the dimension of that
name when the dimension is still unassigned and none of the rule's mesh axes is used yet by this
array. Hence the first matching rule whose mesh axes are all free wins, each mesh axis is used at
most once per array, a name without a rule (or a ``None`` name) is replicated, and a dimension
name occurring twice is an error.

Mesh axes that are absent from a given mesh, or of size 1, are dropped from the result *after*
the assignment, so a rule set written for a large mesh (MaxText's twelve axes) gives the same
answer on a smaller mesh as MaxText does with those axes set to size 1.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

from jax.sharding import PartitionSpec

from ..errors import ShardingError

MeshAxes = tuple[str, ...]
"""Canonical rule value: the mesh axes a logical name shards over (empty: replicated)."""

Rule = tuple[str, MeshAxes]

_UNASSIGNED = object()


def _canonical_axes(value: Any, rule_name: str) -> MeshAxes:
    """Turns a rule value (None, "axis", ["a", "b"], ()) into a tuple of mesh axis names."""
    if value is None:
        return ()
    if isinstance(value, str):
        axes: tuple[Any, ...] = (value,)
    elif isinstance(value, Sequence):
        axes = tuple(value)
    else:
        raise ShardingError(
            f"rule {rule_name!r}: mesh axes must be a name, a list of names or empty, got {value!r}"
        )
    for axis in axes:
        if not isinstance(axis, str) or not axis:
            raise ShardingError(
                f"rule {rule_name!r}: mesh axis names must be non-empty strings, got {value!r}"
            )
    if len(set(axes)) != len(axes):
        raise ShardingError(f"rule {rule_name!r}: a mesh axis occurs twice in {value!r}")
    return axes


def _spec_entry(axes: MeshAxes) -> str | MeshAxes | None:
    if not axes:
        return None
    if len(axes) == 1:
        return axes[0]
    return axes


class LogicalAxisRules(Sequence[Rule]):
    """An ordered, immutable sequence of ``(logical name, mesh axes)`` rules.

    Each rule value is stored canonically as a tuple of mesh axis names: ``"tensor"`` becomes
    ``("tensor",)`` and ``None`` or ``[]`` becomes ``()`` (replicated). Iterating yields these
    pairs, so a ``LogicalAxisRules`` can be passed wherever Flax expects rules
    (``flax.linen.logical_to_mesh_axes(names, tuple(rules))``).

    Attributes:
        mesh_axes: the mesh axes these rules are written for, when known (e.g. MaxText's twelve
            axes); every rule's axes are then checked to be among them.

    Example:
        >>> rules = LogicalAxisRules.from_pairs([("embed", "fsdp"), ("mlp", ("tensor",))])
        >>> rules.to_partition_spec(("embed", "mlp"))
        P('fsdp', 'tensor')
    """

    __slots__ = ("_rules", "_mesh_axes")

    def __init__(self, rules: Iterable[Rule] = (), *, mesh_axes: Iterable[str] | None = None):
        """Builds rules from pairs; see :meth:`from_pairs`, which validates the same way."""
        canonical: list[Rule] = []
        for item in rules:
            if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
                raise ShardingError(
                    f"a logical axis rule must be a (name, mesh axes) pair, got {item!r}"
                )
            name, value = item
            if not isinstance(name, str) or not name:
                raise ShardingError(
                    f"a logical axis rule's name must be a non-empty string, got {item!r}"
                )
            canonical.append((name, _canonical_axes(value, name)))
        known = None if mesh_axes is None else tuple(mesh_axes)
        if known is not None:
            for name, axes in canonical:
                unknown = [a for a in axes if a not in known]
                if unknown:
                    raise ShardingError(
                        f"rule {name!r} -> {axes} names mesh axes {unknown} that are not among "
                        f"the mesh axes {known}"
                    )
        self._rules: tuple[Rule, ...] = tuple(canonical)
        self._mesh_axes: tuple[str, ...] | None = known

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_pairs(
        cls, pairs: Iterable[Sequence[Any]], *, mesh_axes: Iterable[str] | None = None
    ) -> LogicalAxisRules:
        """Builds rules from ``(name, value)`` pairs, value a mesh axis, a sequence, or empty.

        Args:
            pairs: the rules in priority order.
            mesh_axes: optional names of every mesh axis the rules may use.

        Returns:
            The validated rules.

        Raises:
            ShardingError: a pair is malformed, a value repeats a mesh axis, or a rule names a
                mesh axis not in ``mesh_axes``.

        Example:
            >>> LogicalAxisRules.from_pairs([["vocab", ["tensor"]], ["cache_kv", []]])[1]
            ('cache_kv', ())
        """
        return cls(pairs, mesh_axes=mesh_axes)  # type: ignore[arg-type]

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> LogicalAxisRules:
        """Reads rules from a JSON or YAML file.

        The file holds either a list of pairs, or a mapping with key ``logical_axis_rules``
        (MaxText's base.yml spelling) and optionally ``mesh_axes``.

        Args:
            path: a ``.json``, ``.yaml`` or ``.yml`` file.

        Returns:
            The validated rules.

        Raises:
            ShardingError: the file is missing, unparsable, or holds invalid rules.

        Example:
            >>> import json, pathlib, tempfile
            >>> p = pathlib.Path(tempfile.mkdtemp()) / "rules.json"
            >>> _ = p.write_text(json.dumps({"logical_axis_rules": [["embed", "fsdp"]]}))
            >>> LogicalAxisRules.from_file(p).to_pairs()
            (('embed', 'fsdp'),)
        """
        path = pathlib.Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ShardingError(f"cannot read logical axis rules file {path}: {e}") from e
        return cls.from_text(text, source=str(path), yaml_first=path.suffix in (".yaml", ".yml"))

    @classmethod
    def from_text(cls, text: str, *, source: str, yaml_first: bool = False) -> LogicalAxisRules:
        """Parses rules from JSON or YAML text (see :meth:`from_file`).

        Args:
            text: the document.
            source: names it in errors (a path, a package resource).
            yaml_first: parse as YAML first (else JSON, falling back to YAML).

        Raises:
            ShardingError: the text is unparsable or holds invalid rules.
        """
        data: Any
        try:
            if yaml_first:
                data = _load_yaml(text)
            else:
                try:
                    data = json.loads(text)
                except json.JSONDecodeError:
                    data = _load_yaml(text)
        except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
            raise ShardingError(f"cannot parse logical axis rules in {source}: {e}") from e
        mesh_axes = None
        if isinstance(data, Mapping):
            if "logical_axis_rules" not in data:
                raise ShardingError(
                    f"{source} holds a mapping without a 'logical_axis_rules' key "
                    f"(keys: {sorted(map(str, data))})"
                )
            mesh_axes = data.get("mesh_axes")
            data = data["logical_axis_rules"]
        if not isinstance(data, list):
            raise ShardingError(
                f"{source} must hold a list of [name, mesh axes] pairs, got {type(data).__name__}"
            )
        try:
            return cls(data, mesh_axes=mesh_axes)
        except ShardingError as e:
            raise ShardingError(f"{source}: {e}") from e

    # -- the Sequence protocol ----------------------------------------------------------------

    @overload
    def __getitem__(self, index: int) -> Rule: ...

    @overload
    def __getitem__(self, index: slice) -> LogicalAxisRules: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LogicalAxisRules(self._rules[index], mesh_axes=self._mesh_axes)
        return self._rules[index]

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self._rules)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LogicalAxisRules):
            return self._rules == other._rules and self._mesh_axes == other._mesh_axes
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._rules, self._mesh_axes))

    def __repr__(self) -> str:
        shown = ", ".join(f"{n!r}: {_spec_entry(a)!r}" for n, a in self._rules[:4])
        more = f", ... ({len(self._rules)} rules)" if len(self._rules) > 4 else ""
        return f"LogicalAxisRules([{shown}{more}])"

    def __add__(self, other: Iterable[Rule]) -> LogicalAxisRules:
        """Concatenates two rule lists; the left one has priority."""
        other_rules = other if isinstance(other, LogicalAxisRules) else LogicalAxisRules(other)
        mesh_axes = None
        if self._mesh_axes is not None and other_rules.mesh_axes is not None:
            mesh_axes = tuple(dict.fromkeys(self._mesh_axes + other_rules.mesh_axes))
        return LogicalAxisRules(self._rules + other_rules._rules, mesh_axes=mesh_axes)

    # -- queries ------------------------------------------------------------------------------

    @property
    def mesh_axes(self) -> tuple[str, ...] | None:
        """The mesh axes the rules were declared for, or ``None`` when not declared."""
        return self._mesh_axes

    def used_mesh_axes(self) -> tuple[str, ...]:
        """Every mesh axis some rule uses, in first-use order.

        Example:
            >>> LogicalAxisRules.from_pairs([("a", ("x", "y")), ("b", "x")]).used_mesh_axes()
            ('x', 'y')
        """
        return tuple(dict.fromkeys(a for _, axes in self._rules for a in axes))

    def to_pairs(self) -> tuple[tuple[str, str | MeshAxes | None], ...]:
        """Returns the rules with one-axis values as strings and empty values as ``None``.

        Example:
            >>> LogicalAxisRules.from_pairs([("x", ["a"]), ("y", [])]).to_pairs()
            (('x', 'a'), ('y', None))
        """
        return tuple((name, _spec_entry(axes)) for name, axes in self._rules)

    def validate(self, mesh: Any) -> None:
        """Checks that every mesh axis a rule names exists in ``mesh``.

        :meth:`to_partition_spec` silently drops absent axes (as size 1); call this first when
        an absent axis means a typo rather than an axis left out on purpose.

        Args:
            mesh: a ``jax.sharding.Mesh`` or ``AbstractMesh``.

        Raises:
            ShardingError: naming the first offending rule and the mesh's axes.

        Example:
            >>> import jax
            >>> mesh = jax.sharding.AbstractMesh((1,), ("fsdp",))
            >>> LogicalAxisRules.from_pairs([("embed", "fsdp")]).validate(mesh)
        """
        present = tuple(mesh.shape)
        for name, axes in self._rules:
            missing = [a for a in axes if a not in present]
            if missing:
                raise ShardingError(
                    f"rule {name!r} -> {axes} names mesh axes {missing} that the mesh lacks "
                    f"(mesh axes: {present})"
                )

    def mesh_axes_for(self, names: Sequence[str | None]) -> list[MeshAxes]:
        """Assigns mesh axes to each dimension name, before any mesh drop-out.

        Args:
            names: one logical name (or ``None``) per array dimension.

        Returns:
            One tuple of mesh axes per dimension (empty: replicated).

        Raises:
            ShardingError: a name is not a string or ``None``, or occurs twice.

        Example:
            >>> LogicalAxisRules.from_pairs([("embed", ("x", "y"))]).mesh_axes_for(["embed", None])
            [('x', 'y'), ()]
        """
        names = tuple(names)
        for n in names:
            if n is not None and not isinstance(n, str):
                raise ShardingError(
                    f"dimension names must be strings or None, got {n!r} in {names}"
                )
        dups = sorted({n for n in names if n is not None and names.count(n) > 1})
        if dups:
            raise ShardingError(f"dimension names {dups} occur more than once in {names}")
        result: list[Any] = [_UNASSIGNED if n is not None else () for n in names]
        position = {n: i for i, n in enumerate(names) if n is not None}
        used: set[str] = set()
        # Visit rules in priority order (not dimension order), as flax does: an earlier rule
        # for a later dimension can take a mesh axis that a later rule for an earlier
        # dimension wanted.
        for name, axes in self._rules:
            pos = position.get(name)
            if pos is None or result[pos] is not _UNASSIGNED:
                continue
            if used.isdisjoint(axes):
                result[pos] = axes
                used.update(axes)
        return [() if r is _UNASSIGNED else r for r in result]

    def to_partition_spec(
        self, names: Sequence[str | None] | None, *, mesh: Any = None
    ) -> PartitionSpec:
        """Returns the ``PartitionSpec`` for an array whose dimensions have these names.

        Args:
            names: one logical name (or ``None``) per dimension; ``None`` as a whole means an
                unnamed array and gives ``PartitionSpec()`` (fully replicated).
            mesh: optional ``Mesh``/``AbstractMesh``; mesh axes it lacks or of size 1 are
                dropped (a tuple left with one axis becomes that axis, an empty one ``None``).

        Returns:
            A spec with one entry per dimension.

        Raises:
            ShardingError: a dimension name occurs twice or is not a string.

        Example:
            >>> import jax
            >>> pairs = [("embed", ("fsdp", "stage")), ("mlp", "tensor")]
            >>> rules = LogicalAxisRules.from_pairs(pairs)
            >>> mesh = jax.sharding.AbstractMesh((2, 1), ("fsdp", "tensor"))
            >>> rules.to_partition_spec(("embed", "mlp"), mesh=mesh)
            P('fsdp', None)
        """
        if names is None:
            return PartitionSpec()
        assigned = self.mesh_axes_for(names)
        if mesh is not None:
            sizes = mesh.shape
            assigned = [tuple(a for a in axes if sizes.get(a, 1) > 1) for axes in assigned]
        return PartitionSpec(*(_spec_entry(axes) for axes in assigned))


def spec_axes(entry: str | Sequence[str] | None) -> MeshAxes:
    """Returns the mesh axes of one ``PartitionSpec`` entry as a tuple.

    Example:
        >>> spec_axes("tensor"), spec_axes(("fsdp", "tensor")), spec_axes(None)
        (('tensor',), ('fsdp', 'tensor'), ())
    """
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def axes_size(axes: MeshAxes, mesh: Any) -> int:
    """Returns the number of devices the given mesh axes span together (absent axes count 1).

    Example:
        >>> import jax
        >>> axes_size(("a", "b"), jax.sharding.AbstractMesh((2, 4), ("a", "b")))
        8
    """
    sizes = mesh.shape
    return math.prod(sizes.get(a, 1) for a in axes)


def _load_yaml(text: str) -> Any:
    import yaml  # imported lazily: only YAML rule files need it

    return yaml.safe_load(text)
