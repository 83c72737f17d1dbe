"""Atomic file writes: a reader finds the old file or the complete new one, never a part.

Every writer of user files (labels, checkpoints, downloads, ONNX graphs, masks) writes to a
temporary file beside the target and renames it over the target only once it is complete; a
failure, a cancel or a crash leaves the target as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """A new, empty file beside ``path``, renamed onto ``path`` when the body returns.

    Write the file under the yielded name. If the body raises, the temporary file is removed and
    ``path`` is left untouched; if it returns, the rename replaces ``path`` in one step (same
    folder, so same file system).

    Parameters
    ----------
    path : path-like
        The file to write; its folder must exist.
    suffix : str, optional
        Ending of the temporary name. Default: ``path``'s suffixes (``".nii.gz"``), so writers
        that choose the format or compression from the name choose as for ``path``.

    Yields
    ------
    Path
        ``.<name>.tmp-<random><suffix>`` in ``path``'s folder, created empty with the mode a
        new file gets (the user's umask), not a private ``0600`` one.
    """
    path = Path(path)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    stem = (
        path.name[: len(path.name) - len(suffix)]
        if suffix and path.name.endswith(suffix)
        else path.name
    )
    tmp = path.with_name(f".{stem}.tmp-{secrets.token_hex(4)}{suffix}")
    # O_EXCL: never clobber another file.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
