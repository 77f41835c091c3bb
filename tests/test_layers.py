"""The package's architecture, checked: the layers of docs/architecture.md, no private module
imported from outside its package, no import circle between the modules of a package (the
contracts live in .importlinter; `lint-imports` prints the same report)."""

from pathlib import Path

from importlinter import cli

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(REPO)
    code = cli.lint_imports(config_filename=str(REPO / ".importlinter"), no_cache=True)
    assert code == 0, "an import contract is broken: run `lint-imports` for the report"
