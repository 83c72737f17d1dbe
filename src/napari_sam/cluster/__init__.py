"""Cohorts and remote encoding on dask.distributed (the optional ``[cluster]`` extra).

- :mod:`~napari_sam.cluster.tasks`: pure task functions (one volume, slice chunk or image in,
  files on disk out), run the same way serially or on a cluster's workers; no dask needed.
- :mod:`~napari_sam.cluster.batch`: a cohort of tasks through a dask ``Client`` (or serially),
  with retries, resume and a summary.
- :mod:`~napari_sam.cluster.remote`: an ``encode_fn`` for :class:`~napari_sam.VolumeSession`
  that encodes slices on a cluster's workers and falls back to local encoding.

Only ``batch`` and ``remote`` import ``distributed``, and only when a cluster is used.
"""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = (
    "this needs dask.distributed, an optional extra: pip install 'napari-sam-volumes[cluster]' "
    "(or pip install distributed)"
)


def require_distributed() -> ModuleType:
    """Import ``distributed``, or raise ImportError saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return distributed
