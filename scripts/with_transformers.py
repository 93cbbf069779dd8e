"""Run a command with another transformers release installed beside the venv (ahead of it on PYTHONPATH).

    python scripts/with_transformers.py VERSION DIR -- COMMAND...

Installs ``transformers==VERSION`` without dependencies into DIR, then the huggingface-hub that release needs when
the venv's does not satisfy it (transformers 5.17 requires huggingface-hub<2), and runs COMMAND with DIR first on
PYTHONPATH. The rest of the venv (torch, tokenizers, ...) is shared. ``make test-floor`` and ``make test-release``
use it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import PathDistribution, version
from pathlib import Path

from packaging.requirements import Requirement

# What an older huggingface-hub needs that the venv's (2.x, on httpx2) does not bring.
HUB_1 = ["huggingface-hub==1.33.0", "httpx==0.29.0", "httpcore==1.0.9", "anyio==4.16.0", "h11==0.16.0"]


def pip_install(target: Path, *packages: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *packages]
    subprocess.run(command, check=True)


def hub_requirement(target: Path) -> Requirement:
    (info,) = target.glob("transformers-*.dist-info")
    requirements = [Requirement(r) for r in PathDistribution(info).requires or []]
    return next(r for r in requirements if r.name == "huggingface-hub" and r.marker is None)


def parse(argv: list[str], usage: str) -> tuple[str, Path, list[str]] | None:
    """``VERSION DIR -- COMMAND...`` -> (version, an emptied DIR, command); None (usage printed) when malformed."""
    if len(argv) < 4 or argv[2] != "--":
        print(usage, file=sys.stderr)
        return None
    release, target, command = argv[0], Path(argv[1]), argv[3:]
    shutil.rmtree(target, ignore_errors=True)
    return release, target, command


def run_beside(target: Path, command: list[str], what: str) -> int:
    """Run ``command`` with ``target`` first on PYTHONPATH (ahead of the venv), saying ``what`` is there."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
    print(f"with {what} in {target}: {' '.join(command)}", flush=True)
    return subprocess.run(command, env=env).returncode


def main(argv: list[str]) -> int:
    parsed = parse(argv, __doc__)
    if parsed is None:
        return 2
    release, target, command = parsed
    pip_install(target, f"transformers=={release}")
    hub = hub_requirement(target)
    if not hub.specifier.contains(version("huggingface-hub")):
        pip_install(target, *HUB_1)
    return run_beside(target, command, f"transformers {release} (huggingface-hub {hub.specifier})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
