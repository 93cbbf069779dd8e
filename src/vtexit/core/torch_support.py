"""The oldest torch release vtexit is tested on (pyproject.toml declares the same floor; ``make test-torch`` runs the
suite on another release).

Below it, on transformers 5.25: torch 2.7 and 2.8 recompile transformers' compiled static-cache decode at every
generate (they guard on the identity of the cache's buffers; the unpatched model too) and fail to compile
FlexAttention on the CPU (a C++ compile error in the code inductor generates); torch 2.6 cannot ``torch.compile``
transformers' models at all (``torch.compiler.is_exporting`` is missing). Eager runs work there, so an older torch
warns, not refuses.
"""

from __future__ import annotations

import sys
import warnings

from packaging.version import Version

TESTED_TORCH_FLOOR = "2.9"


def is_tested_torch(version: str | None = None) -> bool:
    """Whether ``version`` (default: the torch in use now) is at or above the tested floor (local tags such as
    ``+cpu`` and pre-releases of a later release count as that release)."""
    version = sys.modules["torch"].__version__ if version is None else version
    return Version(Version(str(version)).base_version) >= Version(TESTED_TORCH_FLOOR)


def check_tested_torch(version: str | None = None) -> bool:
    """Warn once per call site when the installed torch is older than the tested floor (installs with ``--no-deps``
    or a pinned environment should know). Returns whether it is at or above it."""
    version = sys.modules["torch"].__version__ if version is None else version
    inside = is_tested_torch(version)
    if not inside:
        warnings.warn(
            f"vtexit is tested with torch>={TESTED_TORCH_FLOOR}; found {version}. Compiled static-cache decode "
            "recompiles at every generate and FlexAttention may not compile there; install a tested release "
            f"(pip install 'torch>={TESTED_TORCH_FLOOR}').",
            UserWarning,
            stacklevel=3,
        )
    return inside
