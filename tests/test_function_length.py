"""No function of the package exceeds 60 lines of code (a structure rule of issue 17).

Code lines are a function's lines without its docstring, blank lines and comment-only lines.
"""

from __future__ import annotations

import ast
import io
import pathlib
import textwrap
import tokenize

import ckptconv

MAX_CODE_LINES = 60
PACKAGE = pathlib.Path(ckptconv.__file__).parent

# Functions over the limit that may stay for now, as "<file>:<qualified name>", each with its
# reason. The list may only shrink: the test fails on an entry that is no longer over the limit.
# It is empty: the two it was written for (convert/distributed.py convert_distributed and
# convert/rules.py scan, owned by another change, to split next) were split by that change.
ALLOWED: set[str] = set()


def _comment_or_blank_lines(source: str) -> set[int]:
    """Line numbers holding nothing but a comment or white space."""
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT):
            continue
        if tok.type in (tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return set(range(1, source.count("\n") + 2)) - code_lines


def code_lines(func: ast.FunctionDef | ast.AsyncFunctionDef, skip: set[int]) -> int:
    """Code lines of ``func``'s body: no signature, docstring, blank or comment-only lines."""
    body = func.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str) and len(body) > 1:
            body = body[1:]
    first = min(getattr(body[0], "lineno", func.end_lineno), func.end_lineno)
    for dec in getattr(body[0], "decorator_list", []):
        first = min(first, dec.lineno)
    return len(set(range(first, func.end_lineno + 1)) - skip)


def _visit(node: ast.AST, prefix: str, skip: set[int], out: dict[str, int]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}{child.name}"
            out[name] = code_lines(child, skip)
            _visit(child, f"{name}.", skip, out)
        elif isinstance(child, ast.ClassDef):
            _visit(child, f"{prefix}{child.name}.", skip, out)
        else:
            _visit(child, prefix, skip, out)


def long_functions(root: pathlib.Path = PACKAGE) -> dict[str, int]:
    """``"<file>:<qualified name>" -> code lines`` of each function over the limit."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        counts: dict[str, int] = {}
        _visit(ast.parse(source), "", _comment_or_blank_lines(source), counts)
        rel = path.relative_to(root).as_posix()
        out.update({f"{rel}:{k}": n for k, n in counts.items() if n > MAX_CODE_LINES})
    return out


def test_no_function_exceeds_60_code_lines():
    found = long_functions()
    over = {k: n for k, n in found.items() if k not in ALLOWED}
    assert not over, "functions over 60 code lines (split them): " + ", ".join(
        f"{k} ({n})" for k, n in sorted(over.items())
    )


def test_allow_list_only_shrinks():
    found = long_functions()
    stale = sorted(ALLOWED - set(found))
    assert not stale, f"no longer over 60 code lines, remove from ALLOWED: {stale}"


def test_counting_excludes_signature_docstring_blank_and_comment_lines(tmp_path):
    head = '(\n    a,\n    b,\n):\n    """Doc\n\n    string."""\n\n    # a comment\n\n'
    body = "".join(
        f"    x{i} = {i}  # trailing comments keep a line\n" for i in range(MAX_CODE_LINES)
    )
    fits = f"def fits{head}{body}"
    too_long = f"def too_long{head}{body}    return 1\n"
    (tmp_path / "ok.py").write_text(fits)
    (tmp_path / "long.py").write_text("class C:\n" + textwrap.indent(too_long, "    "))
    assert long_functions(tmp_path) == {"long.py:C.too_long": MAX_CODE_LINES + 1}
