"""The package as a new user gets it: a wheel, built with the locked setuptools from a copy of the
sources, installed with the runtime lock into a fresh venv outside the checkout, and started from
``/``. Its page, static files and dashboard come from the wheel itself, or the test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.cluster import HOST, REPO, Managed, free_port, http_status, refuse_taken_port

UV = Path(sys.executable).with_name("uv")  # the venv's own uv, from requirements/uv.txt


def run(*argv: str | Path, cwd: Path | str = "/") -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=clean_env())
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def clean_env() -> dict[str, str]:
    """The environment without anything that would let the checkout's code be imported."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the runtime lock and the wheel; its bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    sources = root / "src"  # a copy: no stale build/ folder of the checkout ends up in the wheel
    sources.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, sources / name)
    shutil.copytree(
        REPO / "service", sources / "service", ignore=shutil.ignore_patterns("__pycache__")
    )
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", root / "dist", sources)  # fmt: skip
    (wheel,) = (root / "dist").glob("taskstatus-*.whl")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(UV, "pip", "sync", "--quiet", "--python", python, "--require-hashes",
        REPO / "requirements" / "runtime.txt")  # fmt: skip
    run(UV, "pip", "install", "--quiet", "--python", python, "--no-deps", wheel)
    return venv / "bin"


@pytest.fixture(scope="module")
def wheel_server(wheel_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`taskstatus` from the venv, started in ``/``, on a free port; the port."""
    port = free_port()
    refuse_taken_port(port, "taskstatus")
    argv = [str(wheel_venv / "taskstatus"), "--host", HOST, "--port", str(port)]
    log = tmp_path_factory.mktemp("wheel-log") / "taskstatus.log"
    server = Managed("taskstatus", argv, log, env={"PYTHONPATH": ""}, cwd=Path("/"))
    server.start()
    server.await_start(lambda: http_status(port, "/readyz") == 200, "taskstatus from the wheel")
    yield port
    assert server.stop() == 0, server.log_text()


def test_the_installed_package_is_the_wheel_not_the_checkout(wheel_venv: Path) -> None:
    where = run(wheel_venv / "python", "-c", "import service.app as a; print(a.WEB_DIR)")
    web_dir = Path(where.strip())
    assert web_dir.is_relative_to(wheel_venv.parent), web_dir
    assert (web_dir / "templates" / "board.html").is_file()


@pytest.mark.parametrize("path", ["/", "/dashboard", "/api/status", "/api/tasks/default"])
def test_the_wheel_serves_the_page_dashboard_and_api_from_another_folder(
    wheel_server: int, path: str
) -> None:
    assert http_status(wheel_server, path, timeout=5) == 200


def test_the_wheel_serves_every_static_file_byte_for_byte(wheel_server: int) -> None:
    static = REPO / "service" / "web" / "static"
    files = sorted(p for p in static.iterdir() if p.is_file())
    assert files
    for source in files:
        url = f"http://{HOST}:{wheel_server}/static/{source.name}"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            assert response.read() == source.read_bytes(), source.name
