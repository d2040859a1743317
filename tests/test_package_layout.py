"""How the package and the tests are found: `backend="dsv4_xpu"` after `import dsv4_compile` with or without the
installed entry point, and every test module imported under one name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMPILE_BY_NAME = """
import torch
{before}
import dsv4_compile
from torch._dynamo.backends.registry import _COMPILER_FNS
torch.compile(lambda x: x, backend="dsv4_xpu")  # resolves the name now (InvalidBackend if unknown)
print("BACKEND", _COMPILER_FNS["dsv4_xpu"] is dsv4_compile.dsv4_xpu)
"""

# A source checkout with no install: nothing answers the torch_dynamo_backends group.
WITHOUT_ENTRY_POINT = """
import importlib.metadata as metadata
_real = metadata.entry_points
def _no_dsv4(**params):
    found = _real(**params)
    if params.get("group") == "torch_dynamo_backends":
        found = metadata.EntryPoints(ep for ep in found if ep.name != "dsv4_xpu")
    return found
metadata.entry_points = _no_dsv4
"""


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_names_the_backend_without_an_installed_entry_point():
    assert "BACKEND True" in run_python(WITHOUT_ENTRY_POINT + COMPILE_BY_NAME.format(before=""))


def test_installed_entry_point_and_import_do_not_register_twice():
    # torch loads the entry point (which imports the package) when the name is first looked up ...
    lookup_first = "from torch._dynamo.backends.registry import lookup_backend; lookup_backend('dsv4_xpu')"
    assert "BACKEND True" in run_python(COMPILE_BY_NAME.format(before=lookup_first))
    # ... or the package is imported first and the entry point is never loaded
    assert "BACKEND True" in run_python(COMPILE_BY_NAME.format(before=""))


def test_test_modules_are_imported_under_their_package_name():
    # tests/__init__.py makes `from tests.test_x import ...` and pytest's own import the same module: without it a
    # module defining an op would run twice and fail ("register an operator ... multiple times").
    assert __name__ == "tests.test_package_layout"
    assert "test_package_layout" not in sys.modules
