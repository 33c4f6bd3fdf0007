"""The import contracts of pyproject.toml hold, and each one breaks when its rule is broken.

Every case runs `lint-imports` on a copy of the packages in a temporary folder with one
offending import added there; the source tree is never written to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devkit import CHECKOUT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CORE = "the core does no I/O: no broker, SMTP, metrics, HTTP, database or web imports"
PRODUCER = "the producer side does not import delivery"
TOOLING = "the service does not import the dev tooling"


def copy_project(into: Path) -> Path:
    """service/, devkit/ and pyproject.toml (the contracts) copied into `into`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("service", "devkit"):
        shutil.copytree(CHECKOUT / package, into / package, ignore=ignore)
    shutil.copy2(CHECKOUT / "pyproject.toml", into / "pyproject.toml")
    return into


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the copy: it goes first on the path, ahead of the installed checkout."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_contracts_hold_on_a_copy_of_the_tree(tmp_path: Path) -> None:
    done = lint_imports(copy_project(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    for contract in (CORE, PRODUCER, TOOLING):
        assert f"{contract} KEPT" in done.stdout


@pytest.mark.parametrize(
    ("module", "offending", "contract"),
    [
        ("service/core/message.py", "import aiosmtplib", CORE),
        ("service/core/render.py", "import sqlite3", CORE),
        ("service/producer/publisher.py", "import service.delivery.smtp", PRODUCER),
        ("service/runtime/app.py", "import devkit.kafka", TOOLING),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, offending: str, contract: str
) -> None:
    root = copy_project(tmp_path)
    path = root / module
    path.write_text(f"{path.read_text()}\n{offending}  # added by the test\n")
    done = lint_imports(root)
    assert done.returncode != 0, done.stdout
    assert f"{contract} BROKEN" in done.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    imported = offending.removeprefix("import ")
    assert f"{importer} -> {imported}" in done.stdout
    others = {CORE, PRODUCER, TOOLING} - {contract}
    assert all(f"{other} KEPT" in done.stdout for other in others), done.stdout
