"""The lock check that `make test` runs first (requirements/lock.sh check): quiet while the lock
satisfies pyproject.toml, and a failure that names the fix as soon as it does not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from deploy.cluster import REPO

UV = Path(sys.executable).with_name("uv")


def copy_of_the_project(root: Path) -> Path:
    """pyproject.toml and requirements/ in a folder of their own, to be edited freely."""
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(REPO / "requirements", root / "requirements")
    return root


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(root / "requirements" / "lock.sh"), "check"],
        capture_output=True,
        text=True,
        env={**os.environ, "UV": str(UV)},
        timeout=120,
    )


def test_the_lock_satisfies_pyproject(tmp_path: Path) -> None:
    done = check(copy_of_the_project(tmp_path))
    assert done.returncode == 0, done.stderr


def test_a_dependency_missing_from_the_lock_fails_the_check_and_names_the_fix(
    tmp_path: Path,
) -> None:
    root = copy_of_the_project(tmp_path)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    assert '    "jinja2>=3.1",\n' in text
    pyproject.write_text(text.replace('    "jinja2>=3.1",\n', '    "jinja2>=3.1",\n    "six",\n'))
    done = check(root)
    assert done.returncode == 1
    assert "requirements/runtime.txt no longer satisfies pyproject.toml" in done.stderr
    assert "+six==" in done.stderr
    assert "run 'make lock'" in done.stderr


def requirements(lock: Path) -> list[str]:
    """The entries of a requirements file, each with its continuation lines joined."""
    joined = lock.read_text().replace("\\\n", " ")
    return [line for line in joined.splitlines() if line and not line.lstrip().startswith("#")]


def test_every_locked_package_is_pinned_with_hashes_and_no_index_is_named() -> None:
    locks = sorted((REPO / "requirements").glob("*.txt"))
    assert {p.stem for p in locks} == {"uv", "runtime", "build", "dev", "bench"}
    for lock in locks:
        entries = requirements(lock)
        assert entries, lock.name
        for entry in entries:
            assert not entry.startswith("-"), f"{lock.name} names an option: {entry}"
            name = entry.split()[0]
            assert "==" in name, f"{lock.name}: {name} is not pinned"
            assert "--hash=sha256:" in entry, f"{lock.name}: {name} has no hash"
