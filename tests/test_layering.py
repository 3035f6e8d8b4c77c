"""The layering of docs/DESIGN.md ("Layers") is checked, not hoped for: import-linter's
contracts in pyproject.toml, and no module grows past the size a reader can hold."""

import os
import shutil
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MODULE_LINES = 500


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    assert lint, "import-linter is not installed (pip install -e .[test])"
    r = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr


def test_no_module_is_too_long():
    long = []
    for directory, _dirs, files in os.walk(os.path.join(ROOT, "qnbd")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path) as f:
                    lines = sum(1 for _ in f)
                if lines > MAX_MODULE_LINES:
                    long.append(f"{os.path.relpath(path, ROOT)}: {lines} lines")
    assert not long, "modules over the limit: " + ", ".join(long)
