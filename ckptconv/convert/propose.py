r"""Proposes a mapping file (Linen params -> NNX state) from both trees' leaves.

Layer groups (``layer_3``, ``layers/3``) are paired and matched layer by layer, one ``(\d+)``
rule per pattern when all layers agree; leaves match within paired modules by dtype, shape
(equal, transposed, reshaped, both, split) and shared name tokens. Open choices (the order of
split parts, ties) are written as commented-out alternatives, none active.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

Leaves = dict[str, tuple[tuple[int, ...], str]]
Shape = tuple[int, ...]

_SYNONYMS = {
    "layers": "layer", "blocks": "layer", "block": "layer", "embedder": "embed",
    "embedding": "embed", "embeddings": "embed", "layernorm": "norm", "rmsnorm": "norm",
    "ln": "norm", "weight": "kernel", "w": "kernel", "attention": "attn", "ffn": "mlp",
}  # fmt: skip
_MAX_ORDERS = 24  # at most this many alternatives (4 parts of one split) are written out
_IDX = "{i}"  # the layer number in display paths


@dataclass(frozen=True)
class Match:
    """Source leaves paired with target leaves; ``{i}`` in a path takes each of ``layers``.

    ``kind``: "exact" (same normalised name and shape), "inferred" or "ambiguous".
    """

    kind: str
    source: tuple[str, ...]
    target: tuple[str, ...]
    how: str
    layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class Alternative:
    """One way to resolve an ambiguity: its rules and the match they make."""

    label: str
    rules: tuple[dict, ...]
    match: Match


@dataclass(frozen=True)
class Ambiguity:
    """A choice shapes cannot make; ``position`` is where its rules go in ``rules``."""

    what: str
    position: int
    options: tuple[Alternative, ...]
    match: Match


@dataclass(frozen=True)
class Proposal:
    """A proposed mapping: active rules, what they match, what is left, what is open."""

    rules: list[dict]
    matches: list[Match]
    unmatched_source: list[str]
    unmatched_target: list[str]
    alternatives: list[Ambiguity]
    reasons: dict[str, str] = field(default_factory=dict)  # "source:PATH" / "target:PATH"
    layout: str | None = None

    @property
    def complete(self) -> bool:
        """True when nothing is ambiguous and every leaf on both sides is matched."""
        return not (self.alternatives or self.unmatched_source or self.unmatched_target)

    def resolve(self, choices: Sequence[int]) -> Proposal:
        """Returns the proposal with alternative ``choices[k]`` taken for ambiguity ``k``.

        Args:
            choices: one 0-based alternative index per entry of ``alternatives``.

        Raises:
            ValueError: for a wrong number of choices or an index out of range.
        """
        if len(choices) != len(self.alternatives):
            raise ValueError(f"expected {len(self.alternatives)} choices, got {len(choices)}")
        rules, matches = list(self.rules), list(self.matches)
        todo = sorted(enumerate(zip(self.alternatives, choices, strict=True)),
                      key=lambda x: (-x[1][0].position, -x[0]))  # fmt: skip
        for _, (amb, k) in todo:
            if not 0 <= k < len(amb.options):
                raise ValueError(f"{amb.what}: choice {k} of {len(amb.options)}")
            opt = amb.options[k]
            rules[amb.position : amb.position] = [dict(r) for r in opt.rules]
            matches[matches.index(amb.match)] = opt.match
        return dataclasses.replace(self, rules=rules, matches=matches, alternatives=[])

    def to_yaml(self) -> str:
        """The mapping file; each ambiguity as commented-out alternatives, none active."""
        out = ["version: 1"] + ([f"layout: {self.layout}"] if self.layout else []) + ["rules:"]
        for pos in range(len(self.rules) + 1):
            out += [x for a in self.alternatives if a.position == pos for x in _commented(a)]
            if pos < len(self.rules):
                out.append("  - " + _flow(self.rules[pos])[1:-1])
        return "\n".join([*out, "ignore: []", ""])

    def table(self) -> str:
        """A human-readable table of the matches and of the unmatched leaves."""
        lines = []
        for kind in ("exact", "inferred", "ambiguous"):
            rows = [m for m in self.matches if m.kind == kind]
            lines.append(f"{kind} ({len(rows)}):")
            for m in rows:
                n = f"  [x{len(m.layers)} layers]" if m.layers else ""
                lines.append(f"  {', '.join(m.source)} -> {', '.join(m.target)}: {m.how}{n}")
        for side, paths in (("source", self.unmatched_source), ("target", self.unmatched_target)):
            lines.append(f"unmatched {side} ({len(paths)}):")
            lines += [f"  {p}: {self.reasons.get(f'{side}:{p}', 'no counterpart')}" for p in paths]
        lines.append(f"ambiguities: {len(self.alternatives)}; complete: {self.complete}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-ready dict (for ``--json``)."""
        d = dataclasses.asdict(self)
        d["complete"] = self.complete
        return d


def _adjacent(a: Shape, b: Shape) -> bool:
    """Whether ``reshape`` turns ``a`` into ``b`` by merging or splitting adjacent axes only."""
    pa = list(itertools.accumulate([n for n in a if n != 1], operator.mul))
    pb = list(itertools.accumulate([n for n in b if n != 1], operator.mul))
    cuts = [1, *sorted(set(pa) & set(pb))]
    count = lambda xs, lo, hi: sum(lo < x <= hi for x in xs)  # noqa: E731
    return all(
        min(count(pa, lo, hi), count(pb, lo, hi)) == 1 for lo, hi in itertools.pairwise(cuts)
    )


def _perms(a: Shape, b: Shape) -> list[tuple[int, ...]]:
    """Every ``perm`` with ``np.transpose(x, perm).shape == b`` for ``x.shape == a``."""
    if sorted(a) != sorted(b) or len(a) > 7:
        return []
    return [p for p in itertools.permutations(range(len(a))) if tuple(a[k] for k in p) == b]


def _transforms(a: Shape, b: Shape) -> tuple[int, list[tuple[Shape | None, tuple | None]]]:
    """``(tier, [(reshape, perm), ...])``: the simplest ways to turn shape ``a`` into ``b``.

    Tier 0 is equal shapes, 1 a transpose, 2 a reshape, 3 a reshape then a transpose; more
    than one way is an ambiguity. No way gives ``(9, [])``.
    """
    if a == b:
        return 0, [(None, None)]
    if math.prod(a) != math.prod(b):
        return 9, []
    if perms := _perms(a, b):
        return 1, [(None, p) for p in perms]
    if _adjacent(a, b):
        return 2, [(b, None)]
    mid = sorted({r for r in itertools.permutations(b) if _adjacent(a, r)}) if len(b) < 8 else []
    ways = [(r, p) for r in mid for p in _perms(r, b)]
    return (3, ways) if ways else (9, [])


def _tokens(path: str) -> list[str]:
    return [_SYNONYMS.get(t, t) for t in re.split(r"[/_]+", path.lower()) if t]


def _names(path: str) -> frozenset[str]:
    return frozenset(t for t in _tokens(path) if not t.isdigit())


def _layer_spots(path: str) -> list[tuple[str, int, str]]:
    """``(head, index, tail)`` for each component that can be a layer number."""
    parts, out = path.split("/"), []
    for j, c in enumerate(parts):
        m = re.fullmatch(r"(.*?_)(\d+)", c) if not c.isdigit() else None
        head = "/".join(parts[:j]) + "/" if j else ""
        if c.isdigit() and j:
            out.append((head, int(c), "/".join(["", *parts[j + 1 :]])))
        elif m:
            out.append((head + m[1], int(m[2]), "/".join(["", *parts[j + 1 :]])))
    return out


def _groups(leaves: Leaves) -> tuple[dict[str, dict[int, Leaves]], dict[str, str]]:
    """``{head: {layer: {local path: leaf}}}`` and ``{path: head}`` of the layer groups.

    A group is a stem (``layer_``, ``layers/``) with two or more layer numbers.
    """
    seen: dict[str, set[int]] = {}
    for p in leaves:
        for head, i, _ in _layer_spots(p):
            seen.setdefault(head, set()).add(i)
    out: dict[str, dict[int, Leaves]] = {}
    owner: dict[str, str] = {}
    for p, leaf in sorted(leaves.items()):
        for head, i, tail in _layer_spots(p):
            if len(seen[head]) > 1:
                out.setdefault(head, {}).setdefault(i, {})[tail[1:]] = leaf
                owner[p] = head
                break
    return out, owner


def _pair_groups(src: dict, tgt: dict) -> list[tuple[str, str]]:
    """Pairs source and target layer groups with the same layer numbers (most names shared)."""
    pairs, used = [], set()
    for sh in sorted(src):
        fits = [th for th in sorted(tgt) if th not in used and set(tgt[th]) == set(src[sh])]
        if fits:
            best = max(fits, key=lambda th: len(_names(sh) & _names(th)))
            pairs.append((sh, best))
            used.add(best)
    return pairs


@dataclass(frozen=True)
class _Pair:
    src: str
    tgts: tuple[str, ...]
    axis: int | None
    reshape: Shape | None
    perm: tuple[int, ...] | None
    how: str


@dataclass
class _Scope:
    """Matching inside one scope (a layer, or everything outside layer groups)."""

    src: Leaves
    tgt: Leaves
    pairs: list[_Pair] = field(default_factory=list)
    open: list[tuple[str, tuple[tuple[_Pair, ...], ...]]] = field(default_factory=list)
    reasons: dict[tuple[str, str], str] = field(default_factory=dict)
    dirs: dict[str, str] = field(default_factory=lambda: {"": ""})

    def done(self) -> tuple[set[str], set[str]]:
        """The source and target paths matched or ambiguous so far."""
        every = [*self.pairs, *(p for _, opts in self.open for p in opts[0])]
        return {p.src for p in every}, {t for p in every for t in p.tgts}

    def pair_dirs(self, sd: str, td: str) -> None:
        """Pairs two modules and walks up pairing their parents while both are unpaired."""
        while sd and td and sd not in self.dirs and td not in self.dirs.values():
            self.dirs[sd] = td
            sd, td = sd.rpartition("/")[0], td.rpartition("/")[0]

    def pair_by_name(self) -> None:
        """Pairs child modules of paired modules whose normalised names are equal, unique."""
        s_dirs, t_dirs = (
            {d for p in leaves for d in _ancestors(p)} for leaves in (self.src, self.tgt)
        )
        todo = [("", "")]
        while todo:
            sd, td = todo.pop()
            kids = [[d for d in dirs if d.rpartition("/")[0] == base and d != base]
                    for dirs, base in ((s_dirs, sd), (t_dirs, td))]  # fmt: skip
            keys = [{}, {}]
            for side, ds in enumerate(kids):
                for d in ds:
                    keys[side].setdefault(_names(d.rpartition("/")[2]), []).append(d)
            for k, ss in sorted(keys[0].items(), key=lambda x: x[1]):
                if len(ss) == 1 and len(keys[1].get(k, [])) == 1 and k:
                    self.pair_dirs(ss[0], keys[1][k][0])
                    todo.append((ss[0], keys[1][k][0]))

    def in_scope(self, s: str, t: str) -> bool:
        """Whether ``t`` lies under the module paired with ``s``'s nearest paired ancestor."""
        back = {v: k for k, v in self.dirs.items()}
        ns = next(d for d in _ancestors(s) if d in self.dirs)
        nt = next(d for d in _ancestors(t) if d in back)
        return self.dirs[ns] == nt


def _ancestors(path: str) -> list[str]:
    """Module paths above ``path``, nearest first, ending with the root ``''``."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[:k]) for k in range(len(parts), -1, -1)]


def _candidates(sc: _Scope, left_s: set[str], left_t: set[str]) -> dict[str, dict]:
    """``{source: {target: (key, ways)}}`` over the unmatched leaves in scope."""
    out: dict[str, dict] = {}
    for s in sorted(left_s):
        (a, da), out[s] = sc.src[s], {}
        for t in sorted(left_t):
            (b, db) = sc.tgt[t]
            tier, ways = _transforms(a, b)
            if not ways or not sc.in_scope(s, t):
                continue
            if da != db:
                sc.reasons.setdefault(("s", s), f"shape fits {t}, but dtype {da} != {db}")
                sc.reasons.setdefault(("t", t), f"shape fits {s}, but dtype {db} != {da}")
                continue
            out[s][t] = ((len(_names(s) & _names(t)), -tier), ways)
    return out


def _best(cands: dict[str, dict]) -> tuple[dict, dict]:
    """The best-keyed targets of each source and the best-keyed sources of each target."""
    bs, bt, keys_t = {}, {}, {}
    for s, ts in cands.items():
        if ts:
            top = max(k for k, _ in ts.values())
            bs[s] = {t for t, (k, _) in ts.items() if k == top}
        for t, (k, _) in ts.items():
            keys_t.setdefault(t, []).append((k, s))
    for t, ks in keys_t.items():
        top = max(k for k, _ in ks)
        bt[t] = {s for k, s in ks if k == top}
    return bs, bt


def _one_to_one(sc: _Scope, s: str, t: str, ways: list) -> tuple[_Pair, ...]:
    return tuple(_Pair(s, (t,), None, r, p, _how(sc.src[s][0], sc.tgt[t][0], r, p))
                 for r, p in ways)  # fmt: skip


def _how(a: Shape, b: Shape, reshape, perm, split: str = "") -> str:
    ops = [split] * bool(split) + ["reshape"] * (reshape is not None)
    ops += [f"transpose {list(perm)}"] if perm is not None else []
    return f"{list(a)} -> {list(b)}: " + (", ".join(ops) if ops else "same shape")


def _match_scope(src: Leaves, tgt: Leaves) -> _Scope:
    """Matches one scope's leaves: mutual unique best pairs, then ties, then splits."""
    sc = _Scope(src, tgt)
    sc.pair_by_name()
    while True:
        ds, dt = sc.done()
        cands = _candidates(sc, set(src) - ds, set(tgt) - dt)
        bs, bt = _best(cands)
        new = [(s, next(iter(ts))) for s, ts in bs.items() if len(ts) == 1]
        new = [(s, t) for s, t in new if bt[t] == {s}]
        if not new:
            break
        for s, t in new:
            ways = cands[s][t][1]
            if len(ways) == 1:
                sc.pairs.append(_one_to_one(sc, s, t, ways)[0])
            else:
                sc.open.append((f"{s} -> {t}: {len(ways)} ways to move the axes",
                                tuple((p,) for p in _one_to_one(sc, s, t, ways))))  # fmt: skip
            sc.pair_dirs(s.rpartition("/")[0], t.rpartition("/")[0])
    _ties(sc, cands, bs, bt)
    for s in sorted(set(src) - sc.done()[0]):
        _split(sc, s, sorted(set(tgt) - sc.done()[1]))
    return sc


def _ties(sc: _Scope, cands: dict, bs: dict, bt: dict) -> None:
    """Sources that tie for the same targets (and those for them): one ambiguity per set."""
    seen = set()
    for _, ts in sorted(bs.items()):
        group = sorted(s2 for s2, ts2 in bs.items() if ts2 == ts)
        key = tuple(group)
        if key in seen or len(group) != len(ts) or len(ts) > 4:
            continue
        if any(bt[t] != set(group) for t in ts):
            continue
        seen.add(key)
        if any(len(cands[g][t][1]) != 1 for g in group for t in ts):
            continue
        orders = list(itertools.permutations(sorted(ts)))[:_MAX_ORDERS]
        opts = tuple(
            tuple(_one_to_one(sc, g, t, cands[g][t][1])[0] for g, t in zip(group, o, strict=True))
            for o in orders
        )
        sc.open.append((f"{', '.join(group)} tie for {', '.join(sorted(ts))}", opts))


def _split(sc: _Scope, s: str, left: list[str]) -> None:
    """Splits ``s`` into same-shape unmatched targets in scope, if exactly one way fits."""
    a, da = sc.src[s]
    by_shape: dict[tuple, list[str]] = {}
    for t in left:
        if sc.in_scope(s, t) and sc.tgt[t][1] == da:
            by_shape.setdefault(sc.tgt[t][0], []).append(t)
    found = []
    for b, ts in sorted(by_shape.items()):
        n = len(ts)
        if n < 2 or n * math.prod(b) != math.prod(a):
            continue
        for axis in (k for k in range(len(a)) if a[k] % n == 0):
            part = a[:axis] + (a[axis] // n,) + a[axis + 1 :]
            found += [(ts, axis, r, p) for r, p in _transforms(part, b)[1]]
    if not found:
        sc.reasons.setdefault(("s", s), "no target leaf or same-shape set of them fits")
        return
    ts = found[0][0]
    if len(ts) > 4 or any(f[0] != ts for f in found):
        sc.reasons.setdefault(
            ("s", s), f"splits too many ways ({len(found)} x orders of {len(ts)})"
        )
        return
    orders = _orders(s, ts)
    opts = tuple(
        (_Pair(s, o, ax, r, p, _how(a, sc.tgt[o[0]][0], r, p, f"split axis {ax} in {len(o)}")),)
        for (_, ax, r, p) in found
        for o in orders
    )
    sc.open.append((f"{s} splits into {len(ts)} leaves of one shape: which is which", opts))


def _orders(src: str, tgts: list[str]) -> list[tuple[str, ...]]:
    """Every order of ``tgts``; first the one the source's name spells (``qkv``), if any."""
    name = src.rsplit("/", 1)[-1].lower()
    toks = [_names(t) for t in tgts]
    common = frozenset.intersection(*toks)
    spots = [sorted(tk - common) for tk in toks]
    hint = None
    if all(len(d) == 1 and d[0] in name for d in spots):
        pos = [name.index(d[0]) for d in spots]
        if len(set(pos)) == len(pos):
            hint = tuple(t for _, t in sorted(zip(pos, tgts, strict=True)))
    every = list(itertools.permutations(sorted(tgts)))
    return ([hint] if hint else []) + [o for o in every if o != hint]


def _regex(path: str) -> str:  # noqa: D103
    return "(\\d+)".join(re.escape(piece) for piece in path.split(_IDX))


def _to(path: str) -> str:  # noqa: D103
    return "\\1".join(piece.replace("\\", "\\\\") for piece in path.split(_IDX))


def _anchored(paths: Sequence[str]) -> str:
    """``^...$`` matching exactly ``paths``: a common prefix and suffix, alternatives between."""
    if len(paths) == 1:
        return f"^{_regex(paths[0])}$"
    pre = "/".join(_common([p.split("/") for p in paths]))
    pre = pre + "/" if pre else ""
    rest = [p[len(pre) :] for p in paths]
    suf = "/".join(reversed(_common([list(reversed(r.split("/"))) for r in rest])))
    suf = "/" + suf if suf else ""
    mids = [r[: len(r) - len(suf)] for r in rest]
    return f"^{_regex(pre)}(?:{'|'.join(_regex(m) for m in mids)}){_regex(suf)}$"


def _common(lists: list[list[str]]) -> list[str]:
    out = []
    for items in zip(*lists, strict=False):
        if len(set(items)) != 1 or any(len(x) == len(out) + 1 for x in lists):
            break
        out.append(items[0])
    return out


def _rules(p: _Pair, src: str, tgts: tuple[str, ...]) -> list[dict]:
    """The rule chain of one pair, on full display paths."""
    out: list[dict] = []
    if p.axis is not None:
        out.append({"split": {"match": f"^{_regex(src)}$", "axis": p.axis,
                              "to": [_to(t) for t in tgts]}})  # fmt: skip
    elif src != tgts[0]:
        out.append({"rename": {"match": f"^{_regex(src)}$", "to": _to(tgts[0])}})
    if p.reshape is not None:
        out.append({"reshape": {"match": _anchored(tgts), "shape": list(p.reshape)}})
    if p.perm is not None:
        out.append({"transpose": {"match": _anchored(tgts), "perm": list(p.perm)}})
    return out


def _flow(value) -> str:
    """YAML flow style: single-quoted strings, ``[..]`` lists, ``{k: v}`` mappings."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def _short(srcs: tuple[str, ...], tgts: tuple[str, ...]) -> str:
    """``'q_proj, k_proj, v_proj'`` for ``layers/{i}/attn/q_proj/kernel, ...``."""

    def cut(paths: tuple[str, ...]) -> list[str]:
        parts = [p.split("/") for p in paths]
        pre, suf = len(_common(parts)), len(_common([c[::-1] for c in parts]))
        return ["/".join(c[pre : len(c) - suf]) for c in parts]

    names = cut(tgts)
    if len(set(srcs)) > 1:
        names = [f"{s} -> {n}" for s, n in zip(cut(srcs), names, strict=True)]
    return ", ".join(names)


def _commented(amb: Ambiguity) -> list[str]:
    out = [f"  # AMBIGUOUS: {amb.what}.",
           f"  # Uncomment exactly ONE of the {len(amb.options)} alternatives below."]  # fmt: skip
    for k, opt in enumerate(amb.options, 1):
        out.append(f"  # -- alternative {k}: {opt.label}")
        out += [f"  # - {_flow(r)[1:-1]}" for r in opt.rules]
    return out


class _Out:
    def __init__(self):
        self.chains: list[tuple[str, list[dict] | None, Match, Ambiguity | None]] = []
        self.unmatched_s, self.unmatched_t, self.reasons = [], [], {}


def _emit(out: _Out, sc: _Scope, frame: tuple[str, str, str], layers: Sequence[int]) -> None:
    """Adds a scope's results to ``out``; ``frame`` is (source head, target head, index)."""
    sh, th, idx = frame

    def full(head: str, local: str) -> str:
        return head + idx + ("/" + local if local else "") if head else local

    for p in sc.pairs:
        src, tgts = full(sh, p.src), tuple(full(th, t) for t in p.tgts)
        same = p.axis is None and p.reshape is None and p.perm is None
        kind = "exact" if same and _tokens(p.src) == _tokens(p.tgts[0]) else "inferred"
        out.chains.append((src, _rules(p, src, tgts), Match(kind, (src,), tgts, p.how, layers),
                           None))  # fmt: skip
    for what, opts in sc.open:
        alts = []
        for opt in opts:
            srcs = tuple(full(sh, p.src) for p in opt)
            tgts = tuple(full(th, t) for p in opt for t in p.tgts)
            chains = [_rules(p, full(sh, p.src), tuple(full(th, t) for t in p.tgts)) for p in opt]
            rules = [r for chain in chains for r in chain]
            m = Match("inferred", srcs, tgts, "; ".join(p.how for p in opt), layers)
            alts.append(Alternative(_short(srcs, tgts), tuple(rules), m))
        what = f"{what} (in {full(sh, '') or 'the root'})" if sh else what
        m = alts[0].match
        m = Match("ambiguous", tuple(sorted(set(m.source))), tuple(sorted(m.target)), what, layers)
        out.chains.append((m.source[0], None, m, Ambiguity(what, -1, tuple(alts), m)))
    numbers = [str(i) for i in layers] if idx == _IDX else [idx]
    for side, leaves, head, bucket in (("s", sc.src, sh, out.unmatched_s),
                                       ("t", sc.tgt, th, out.unmatched_t)):  # fmt: skip
        for local in sorted(set(leaves) - sc.done()[side == "t"]):
            for n in numbers:
                path = full(head, local).replace(_IDX, n)
                bucket.append(path)
                why = sc.reasons.get((side, local), "no counterpart")
                out.reasons[("source:" if side == "s" else "target:") + path] = why


def propose(source: Leaves, target: Leaves, *, layout: str | None = None) -> Proposal:
    """Proposes the mapping of ``source`` leaves onto ``target`` leaves.

    Args:
        source: ``{'/'-joined path: (shape, dtype name)}`` of the Linen params tree.
        target: the same for the NNX state (no ``model/`` prefix, no ``/value``).
        layout: the source layout, written into the mapping file if given.

    Returns:
        A :class:`Proposal`; deterministic for the same inputs.
    """
    (src_g, owner_s), (tgt_g, owner_t), out = _groups(source), _groups(target), _Out()
    paired = _pair_groups(src_g, tgt_g)
    for sh, th in paired:
        layers = sorted(src_g[sh])
        scopes = [_match_scope(src_g[sh][i], tgt_g[th][i]) for i in layers]
        first = scopes[0]
        if all((s.src, s.tgt, s.pairs, s.open) == (first.src, first.tgt, first.pairs, first.open)
               for s in scopes):  # fmt: skip
            _emit(out, first, (sh, th, _IDX), tuple(layers))
        else:  # a layer differs from layer 0: rules per layer
            for i, sc in zip(layers, scopes, strict=True):
                _emit(out, sc, (sh, th, str(i)), ())
    heads_s, heads_t = {sh for sh, _ in paired}, {th for _, th in paired}
    rest_s = {p: v for p, v in source.items() if owner_s.get(p) not in heads_s}
    rest_t = {p: v for p, v in target.items() if owner_t.get(p) not in heads_t}
    _emit(out, _match_scope(rest_s, rest_t), ("", "", ""), ())
    return _assemble(out, layout)


def _assemble(out: _Out, layout: str | None) -> Proposal:
    rules, matches, ambs = [], [], []
    for _, chain, match, amb in sorted(out.chains, key=lambda c: c[0]):
        matches.append(match)
        if amb is None:
            rules += chain
        else:
            ambs.append(dataclasses.replace(amb, position=len(rules)))
    return Proposal(rules, matches, sorted(out.unmatched_s), sorted(out.unmatched_t), ambs,
                    out.reasons, layout)  # fmt: skip
