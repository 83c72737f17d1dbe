"""Model weights: the cache folder, verified downloads, safe reading, type detection, loading.

Everything that turns "a model name or a checkpoint file" into a ready
:class:`~napari_sam.models.sam.Sam` lives here, one concern per module:

- :mod:`.cache`: :func:`cache_dir`, :func:`cached_path`, :func:`is_cached`,
  :func:`destination`: where downloaded weights are kept (``NAPARI_SAM_CACHE`` overrides the
  per-user cache folder).
- :mod:`.fetch`: :func:`download`: stream into a temporary file beside the final one, verify
  size and SHA-256, then rename; a failed, cancelled or mismatching download never leaves a
  file under the final name.
- :mod:`.checkpoint`: :func:`read_state_dict` (``.safetensors``, or a PyTorch pickle loaded
  with ``weights_only=True``, so a checkpoint can never run code) and :func:`save_checkpoint`
  (a state dict with its spec embedded, written atomically).
- :mod:`.detect`: :func:`detect_spec`: the model type from tensor shapes alone;
  :func:`same_architecture`.
- :mod:`.loading`: :func:`load_model`: name, spec or path -> model on a device; Meta's
  :func:`build_sam` / :data:`sam_model_registry`.
- :mod:`.hf`: transformers-format checkpoints (``save_pretrained`` folders, shard indexes,
  ``pytorch_model.bin``), renamed into this package's keys; the ``TRANSFORMERS`` entry of
  :data:`.checkpoint.FORMATS`.
- :mod:`.hub`: registry entries with a Hugging Face Hub source, downloaded through
  ``huggingface_hub`` and verified before they are installed (:func:`download` hands them over).

Extension points
----------------
A new checkpoint **format** (a Hugging Face folder with ``config.json`` and
``model.safetensors``, say) is a :class:`~.checkpoint.CheckpointFormat` ``(name, matches,
read)`` added to :data:`.checkpoint.FORMATS` before the PyTorch fallback: ``matches(path) ->
bool`` looks at the path only, ``read(path) -> (tensors, spec or None)`` returns the tensors
under this package's key names (rename foreign keys there) and the spec when the file knows it.

A new model **family** (SAM 2's ``image_encoder.trunk.*`` / ``memory_attention.*``, say) is a
:class:`~.detect.Detector` ``(family, expects, claims, detect)`` added to
:data:`.detect.DETECTORS`: ``claims(state_dict) -> bool`` from the keys, ``detect(state_dict)
-> ModelSpec`` from the shapes. Its architecture must also be buildable by
:func:`napari_sam.models.build.build_sam` from that spec. Nothing else changes:
:func:`load_model` reads with :func:`read_state_dict`, recognises with :func:`detect_spec`,
checks an embedded spec against the detected one, builds and loads.
"""

from __future__ import annotations

from napari_sam.weights.cache import (
    CACHE_ENV,
    cache_dir,
    cached_path,
    destination,
    is_cached,
    sha256_file,
)
from napari_sam.weights.checkpoint import (
    SPEC_METADATA_KEY,
    UnsafeCheckpointError,
    read_state_dict,
    save_checkpoint,
)
from napari_sam.weights.detect import detect_spec, same_architecture
from napari_sam.weights.fetch import (
    BASE_URL_ENV,
    ChecksumError,
    DownloadCancelled,
    WeightsUnavailableError,
    download,
)
from napari_sam.weights.loading import (
    build_sam,
    load_model,
    load_state_dict_into,
    resolve_device,
    sam_model_registry,
)

__all__ = [
    "BASE_URL_ENV",
    "CACHE_ENV",
    "SPEC_METADATA_KEY",
    "ChecksumError",
    "DownloadCancelled",
    "UnsafeCheckpointError",
    "WeightsUnavailableError",
    "build_sam",
    "cache_dir",
    "cached_path",
    "destination",
    "detect_spec",
    "download",
    "is_cached",
    "load_model",
    "load_state_dict_into",
    "read_state_dict",
    "resolve_device",
    "sam_model_registry",
    "same_architecture",
    "save_checkpoint",
    "sha256_file",
]
