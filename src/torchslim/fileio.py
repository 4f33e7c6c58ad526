"""Atomic file writes: every file torchslim writes appears whole or not at all.

A writer fills a temporary sibling (created with mode "x", so it gets the usual umask
permissions rather than ``mkstemp``'s 0600) and renames it over the target; on any failure the
sibling is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling path to write; renamed over ``path`` when the block succeeds.

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(p) as tmp:
    ...     _ = tmp.write_text("done")
    >>> p.read_text(), sorted(x.name for x in p.parent.iterdir())
    ('done', ['a.txt'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing (text mode is UTF-8); renamed over
    ``path`` when the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, inf) replaced by None, so that the JSON
    written is strict (RFC 8259: parsers other than Python's reject a bare ``NaN``).

    Examples
    --------
    >>> strict_json({"a": [1.0, float("nan")], "b": float("inf")})
    {'a': [1.0, None], 'b': None}
    """
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, strict JSON to ``path`` atomically (non-finite floats become
    null: see :func:`strict_json`)."""
    write_text(path, json.dumps(strict_json(data), indent=2, allow_nan=False))


#: names of what a writer killed mid-write leaves: atomic_path's files, artifact.save's folders
_TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$|^\.model\.[a-z0-9_]{8}$")


def sweep_temporaries(root: str | os.PathLike) -> list[Path]:
    """Remove, under ``root``, the temporary files and folders of writers that were killed
    before they could rename or remove them (a kill during plotting or saving); returns them.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / ".a.png.123.0123abcd.tmp").write_bytes(b"")
    >>> [p.name for p in sweep_temporaries(d)], list(d.iterdir())
    (['.a.png.123.0123abcd.tmp'], [])
    """
    import shutil

    found = [p for p in Path(root).rglob(".*") if _TEMPORARY.match(p.name)]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on the file ``path`` (created, holding this
    process's pid) for the block; removed afterwards. The lock dies with the process, so a
    killed run leaves no stale lock: a leftover file is taken over.

    Raises
    ------
    UserError
        When another process holds it (``what`` says what is locked; the message gives its pid).
    """
    import fcntl

    from .errors import UserError

    path = Path(path)
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{what} is in use by another torchslim run (pid {holder}); wait for it to "
                            "finish or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and lock: take the new one
    else:
        raise UserError(f"{what}: could not take the lock file {path}")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
