"""The zoo's on-disk cache: entries that are either complete and verified, or rebuilt.

An entry is a folder built under a temporary name and renamed into place only when it is
complete, with a manifest listing every file's size and SHA-256 and the fingerprint of the
recipe that built it. A folder whose manifest is missing, whose fingerprint differs, or whose
files do not match is treated as absent and rebuilt: a half-built or corrupted expert is never
trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "polymerge-zoo.json"
ENV_CACHE = "POLYMERGE_ZOO_CACHE"


def default_cache() -> Path:
    """``$POLYMERGE_ZOO_CACHE`` or ``~/.cache/polymerge/zoo``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "polymerge" / "zoo"


def fingerprint(config: Any) -> str:
    """A short stable hash of a JSON-able recipe; changing any field rebuilds the entry."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def entry_ok(path: Path, fp: str | None = None, *, deep: bool = True) -> bool:
    """True when ``path`` is a complete entry (of fingerprint ``fp`` when given).

    ``deep`` also checks every file's SHA-256; otherwise sizes only (fast, for readers).
    """
    man = read_manifest(path)
    if not man or not isinstance(man.get("files"), dict):
        return False
    if fp is not None and man.get("fingerprint") != fp:
        return False
    for rel, meta in man["files"].items():
        f = path / rel
        try:
            if f.stat().st_size != meta["size"]:
                return False
        except OSError:
            return False
        if deep and sha256_file(f) != meta["sha256"]:
            return False
    return True


def build_entry(path: Path, fp: str, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Build ``path`` with ``build(tmp_dir) -> info`` unless a verified entry is there.

    Returns the manifest. The entry appears atomically (rename), so an interrupted build leaves
    only a temporary folder, removed on the next attempt.
    """
    if entry_ok(path, fp):
        man = read_manifest(path)
        assert man is not None
        return man
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    if path.exists():
        shutil.rmtree(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    tmp.mkdir()
    start = time.time()
    try:
        info = build(tmp)
        man = {
            "fingerprint": fp,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "build_seconds": round(time.time() - start, 2),
            "info": info,
            "files": {str(f.relative_to(tmp)): {"size": f.stat().st_size,
                                                "sha256": sha256_file(f)}
                      for f in _files(tmp)},
        }
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2))
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process finished the same entry first: keep theirs if it is sound.
            if not entry_ok(path, fp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = read_manifest(path)
    assert done is not None
    return done


def _remove_stale_partials(path: Path) -> None:
    """Delete temporary folders of ``path`` left by builds whose process is gone."""
    for p in path.parent.glob(f".{path.name}.partial*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_json(path: Path, key: str) -> Any | None:
    """A cached JSON value stored under ``key`` (a fingerprint), or None."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d.get("value") if d.get("key") == key else None


def save_json(path: Path, key: str, value: Any) -> None:
    """Write a JSON cache file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps({"key": key, "value": value}, indent=1))
    os.replace(tmp, path)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = list(f.keys())  # noqa: SIM118 - safe_open is not a mapping
        return {k: tuple(f.get_slice(k).get_shape()) for k in names}


def safetensors_numel(path: Path) -> int:
    """Number of stored values in a safetensors file."""
    import math

    return sum(math.prod(s) for s in safetensors_shapes(path).values())
