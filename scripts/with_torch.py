"""Run a command with another torch release installed beside the venv (ahead of it on PYTHONPATH).

    python scripts/with_torch.py VERSION DIR -- COMMAND...

Installs ``torch==VERSION`` with its dependencies into DIR (from PyPI on Linux that is a CUDA build, a few GB; it runs
on the CPU too), then deletes from DIR every package the venv already holds in a version that torch accepts, so the
rest of the environment stays the one the suite is pinned to (constraints.txt) and only torch, triton and the
libraries torch pins change. ``make test-torch TORCH=2.7.1`` uses it for pyproject's torch floor.

A machine whose pip configuration caps torch (a ``constraint`` file) needs ``PIP_CONSTRAINT=/dev/null`` for a release
above the cap.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, PathDistribution, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from with_transformers import parse, run_beside  # this script's folder is first on sys.path


def torch_requirements(target: Path) -> dict[str, Requirement]:
    """torch's own requirements for this platform, by canonical name."""
    (info,) = target.glob("torch-*.dist-info")
    requirements = (Requirement(r) for r in PathDistribution(info).requires or [])
    return {
        canonicalize_name(r.name): r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})
    }


def drop_what_the_venv_has(target: Path) -> list[str]:
    """Delete from ``target`` each distribution (not torch) that the venv holds in a version torch accepts."""
    wanted = torch_requirements(target)
    dropped = []
    for info in sorted(target.glob("*.dist-info")):
        distribution = PathDistribution(info)
        name = canonicalize_name(distribution.metadata["Name"])
        if name == "torch":
            continue
        try:
            have = version(name)  # the venv's copy: target is not on this process's path
        except PackageNotFoundError:
            continue
        if name in wanted and not wanted[name].specifier.contains(have, prereleases=True):
            continue
        for entry in distribution.files or []:
            path = target / entry
            if path.is_file() or path.is_symlink():
                path.unlink()
        shutil.rmtree(info, ignore_errors=True)
        dropped.append(f"{name} {have}")
    for folder in sorted(target.iterdir()):  # package folders the deletions emptied
        if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
            shutil.rmtree(folder)
    return dropped


def main(argv: list[str]) -> int:
    parsed = parse(argv, __doc__)
    if parsed is None:
        return 2
    release, target, command = parsed
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-warn-conflicts", "--target", str(target)]
    subprocess.run([*pip, f"torch=={release}"], check=True)
    dropped = drop_what_the_venv_has(target)
    return run_beside(target, command, f"torch {release} (the venv's own: {', '.join(dropped) or 'none'})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
