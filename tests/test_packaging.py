"""The wheel works on its own: templates ship inside it; `notifier dev` says it needs a checkout.

The wheel is built from the checkout (hatchling, no build isolation: offline) and installed
with --no-deps into a fresh virtual environment that borrows the project venv's
site-packages for the dependencies (a plain path in a .pth file: the checkout's editable
install, itself a .pth, is not processed from there, so only the wheel provides `service`).
Then the installed `notifier` runs from a folder outside the checkout.
"""

from __future__ import annotations

import email
import email.policy
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from devkit import CHECKOUT, EXAMPLES

# A real build and install, not a unit: left out of the quick tier with the server tests.
pytestmark = pytest.mark.integration


def run(*cmd: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv with only the wheel installed (dependencies borrowed)."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    built = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--quiet", "--wheel-dir", dist, CHECKOUT,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = dist.glob("ticket_notifier-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    site = Path(purelib.stdout.strip())
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "--quiet", wheel,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return env_dir / "bin"


def notifier(bin_dir: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "PYTHON"))}
    return run(bin_dir / "notifier", *args, cwd=cwd, env={**clean, **env})


def test_the_installed_package_is_the_wheel_with_its_templates(installed: Path) -> None:
    probe = run(
        installed / "python",
        "-c",
        "import service; from service.runtime.settings import default_templates_dir as d; "
        "print(service.__file__); print(d())",
        cwd=installed,
    )
    assert probe.returncode == 0, probe.stderr
    package, templates = (Path(line) for line in probe.stdout.splitlines())
    venv_root = installed.parent.resolve()
    assert package.resolve().is_relative_to(venv_root), package
    assert templates == package.parent / "templates"
    assert (templates / "en" / "customer_content.html").is_file()
    assert (templates / "layout.html").is_file()


def test_preview_from_the_wheel_needs_no_templates_dir(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = notifier(
        installed,
        tmp_path,
        "preview",
        str(EXAMPLES / "events" / "01-customer-content.json"),
        "--out",
        str(out),
        NOTIFY_DIRECTORY_FILE=str(EXAMPLES / "directory.yaml"),
        NOTIFY_ATTACHMENTS_DIR=str(EXAMPLES / "attachments"),
    )
    assert done.returncode == 0, done.stderr
    emls = sorted(out.glob("*.eml"))
    assert len(emls) == 3  # customer, bob, carol (as from the checkout: test_cli)
    for path in emls:
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert message["Subject"] == "[T-1042] Printer on floor 3 jams"
        assert message.get_body(preferencelist=("html",)) is not None


def test_dev_from_the_wheel_says_in_one_line_that_it_needs_a_checkout(
    installed: Path, tmp_path: Path
) -> None:
    done = notifier(installed, tmp_path, "dev", "up")
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "checkout" in line
    assert done.stdout == ""
