"""The package's architecture, checked: the layers of docs/architecture.md, no private module
imported from outside its package, no import circle between the modules of a package (the
contracts live in .importlinter; `lint-imports` prints the same report)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# In a child process: import-linter configures logging with disable_existing_loggers, which would
# silence the package's loggers for every test after this one.
_LINT = ("import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, no_logo=True))")


def test_import_contracts_are_kept():
    done = subprocess.run([sys.executable, "-c", _LINT], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert "3 kept, 0 broken" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0


# ------------------------------------------------------------------ source rules (AST)
import ast  # noqa: E402

_PACKAGE = REPO / "wsi_ssl"
_MAX_FUNCTION_LINES = 60


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _sources(root: Path):
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        yield path.relative_to(REPO), text.splitlines(), ast.parse(text)


def test_function_level_imports_say_why_they_are_lazy():
    """Imports sit at module top; one inside a function (a heavy third-party dependency, or the
    lazy boundary that keeps ``import wsi_ssl`` / ``wsi-ssl --help`` light) says why with a
    ``# lazy:`` comment on its line."""
    unmarked = set()
    for rel, lines, tree in _sources(_PACKAGE):
        for fn in _functions(tree):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    span = lines[node.lineno - 1:node.end_lineno]
                    if not any("# lazy:" in line for line in span):
                        unmarked.add(f"{rel}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unmarked, ("function-level imports without a '# lazy: <why>' comment (move them "
                          "to module top):\n" + "\n".join(sorted(unmarked)))


def test_functions_fit_on_a_screen():
    """No library function over 60 lines (its docstring not counted): long work is named steps."""
    long = []
    for rel, _lines, tree in _sources(_PACKAGE):
        for fn in _functions(tree):
            body = fn.body
            doc = (body[0].end_lineno - body[0].lineno + 1
                   if body and isinstance(body[0], ast.Expr)
                   and isinstance(body[0].value, ast.Constant)
                   and isinstance(body[0].value.value, str) else 0)
            n = fn.end_lineno - fn.lineno + 1 - doc
            if n > _MAX_FUNCTION_LINES:
                long.append(f"{rel}:{fn.lineno} {fn.name}: {n} lines")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_scripts_use_the_public_api():
    """benchmarks/ and examples/ import no private module of the package (what they need is
    public): they are what a user copies."""
    private = []
    for folder in ("benchmarks", "examples"):
        for rel, lines, tree in _sources(REPO / folder):
            for node in ast.walk(tree):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "wsi_ssl" and any(p.startswith("_") for p in parts[1:]):
                        private.append(f"{rel}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not private, "private wsi_ssl modules imported by scripts:\n" + "\n".join(private)
