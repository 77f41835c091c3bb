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
