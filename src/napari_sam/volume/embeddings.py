"""Per-slice image embeddings of a volume: computed once, kept in memory, stored on disk.

Encoding a slice is the expensive step of SAM (seconds on a CPU); every prompt after it is cheap.
:class:`EmbeddingCache` encodes a slice the first time it is needed and keeps the result:

- in memory, in a least-recently-used store bounded by ``max_memory_slices`` (one slice of an
  official model is ``256 x 64 x 64`` float32 = 4 MiB, so the default 32 slices hold at most
  128 MiB);
- on disk (optional ``cache_dir``), one folder per cache key, one float16 file per slice (2 MiB
  for official models), each written atomically, plus ``manifest.json`` holding the full key.

The key names everything an embedding depends on: the volume's content (SHA-256 of all its bytes,
plus shape and dtype), the slicing axis, the model (spec name, image size, preprocessing and a
SHA-256 of its weights), the intensity window and free-form encoder settings. A store whose
manifest does not match its key is wiped and rebuilt; a slice file that cannot be read back
exactly (truncated, bad checksum, wrong shape) is recomputed. Slices written before a crash or a
cancel are reused by the next run.

Several processes (cluster workers, a napari session and a batch job) may fill one store at the
same time, on a local disk or a network mount every one of them sees. No lock is needed: every
file is written under a temporary name of its own writer (host, process id, random part) and
renamed into place, so a reader sees a whole slice file or none; the manifest is created once by
an exclusive hard link (the first writer wins, the others read its manifest); temporary files
left by a killed writer are removed by the next process opening the store (its process is gone,
or the file is a day old when it came from another host).

When a disk store is used, freshly computed embeddings are rounded to float16 before use too, so
a slice gives the same masks whether it was just computed or read back from disk.

Prefetching needs no extra machinery: a background thread calling :meth:`EmbeddingCache.get` on
the neighbours of the current slice fills the cache, and a foreground ``get`` of a slice being
computed waits for that computation instead of starting another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

if TYPE_CHECKING:
    from napari_sam.intensity import Window
    from napari_sam.registry import ModelSpec

__all__ = [
    "EmbeddingCache",
    "default_cache_dir",
    "sweep_temporaries",
    "volume_fingerprint",
    "weights_fingerprint",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

Entry = tuple[torch.Tensor, tuple[int, int], tuple[int, int]]
EncodeFn = Callable[[Any, np.ndarray], tuple[torch.Tensor, tuple[int, int]]]
Cancel = Callable[[], bool] | threading.Event | None


def default_cache_dir() -> Path:
    """Default folder for embedding stores.

    ``$NAPARI_SAM_EMBEDDINGS`` when set, else ``embeddings/`` inside the model cache folder
    (:func:`napari_sam.weights.cache_dir`: ``$NAPARI_SAM_CACHE`` or the per-user cache folder).
    """
    explicit = os.environ.get("NAPARI_SAM_EMBEDDINGS")
    if explicit:
        return Path(explicit).expanduser()
    from napari_sam.weights import cache_dir

    return cache_dir() / "embeddings"


def volume_fingerprint(volume: np.ndarray) -> str:
    """SHA-256 of a volume's shape, dtype and every byte of its data (about 1.4 GB/s here)."""
    volume = np.asarray(volume)
    digest = hashlib.sha256(f"{volume.shape}|{volume.dtype.str}|".encode())
    # Slab by slab (C order), so a non-contiguous view never needs a full-size copy.
    for slab in volume if volume.ndim > 2 else [volume]:
        digest.update(np.ascontiguousarray(slab).data.cast("B"))
    return digest.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(t.view(torch.uint8).numpy()).cast("B"))
    return digest.hexdigest()


def _is_cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


class EmbeddingCache:
    """Image embeddings of the slices of one volume, computed on first need.

    Parameters
    ----------
    model : Sam
        The model whose image encoder is used (its ``spec`` names it in the cache key).
    volume : ndarray, shape (Z, Y, X) or (Z, Y, X, 3|4) for RGB
        The volume in display orientation. It is not copied: do not modify it while the cache
        is in use (the disk key is computed from its content once).
    axis : int
        Slicing axis (0, 1 or 2); slice ``i`` is ``np.take(volume, i, axis)``.
    window : Window, optional
        Intensity window turning a grayscale slice into 8-bit (``napari_sam.intensity``). None
        means ``make_window(volume, "auto")``: one window for the whole volume, so neighbouring
        slices are encoded consistently. Ignored for uint8 RGB volumes.
    cache_dir : path, optional
        Folder for the on-disk store (see :func:`default_cache_dir`); None keeps embeddings in
        memory only.
    max_memory_slices : int
        Bound of the in-memory store, in slices (bytes: ``max_memory_slices * 256 * E * E * 4``;
        4 MiB per slice for official models).
    encoder_settings : str
        Anything else the encoder output depends on; part of the key, after the model's own
        ``encoder_settings`` (set by :func:`napari_sam.speed.optimize`).
    encode_fn : callable, optional
        ``encode_fn(model, rgb_uint8) -> (embedding 1x256xExE, input_size)``; default
        :func:`napari_sam.predictor.encode_image`.
    model_key : str, optional
        Fingerprint of the model's weights (e.g. a checkpoint's SHA-256); computed from the
        state dict when needed and not given. Pass it to share one hash between caches.

    Notes
    -----
    Thread-safe: :meth:`get` may run in a worker thread while another thread calls :meth:`has`;
    the lock is never held while encoding, and two threads asking for the same slice encode it
    once.
    """

    def __init__(
        self,
        model: Any,  # what encode_fn takes: a Sam by default, a SAM 2 model for tracking
        volume: np.ndarray,
        *,
        axis: int = 0,
        window: Window | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_memory_slices: int = 32,
        encoder_settings: str = "",
        encode_fn: EncodeFn | None = None,
        model_key: str | None = None,
    ) -> None:
        volume = np.asarray(volume)
        self.rgb = volume.ndim == 4 and volume.shape[-1] in (3, 4)
        if volume.ndim != 3 and not self.rgb:
            raise ValueError(
                f"volume must have shape (Z, Y, X) or (Z, Y, X, 3|4) for RGB, got {volume.shape}"
            )
        if not -3 <= axis < 3:
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        if max_memory_slices < 0:
            raise ValueError(f"max_memory_slices must be >= 0, got {max_memory_slices}")
        self.model = model
        self.volume = volume
        self.axis = axis % 3
        self.num_slices = int(volume.shape[self.axis])
        rows, cols = (int(s) for i, s in enumerate(volume.shape[:3]) if i != self.axis)
        self.slice_shape = (rows, cols)
        if window is None and not (self.rgb and volume.dtype == np.uint8):
            from napari_sam.intensity import make_window

            window = make_window(volume, "auto")
        self.window = window
        self.max_memory_slices = int(max_memory_slices)
        # The model's own settings (a fast model's precision) always join the key, so fast and
        # exact embeddings of the same volume never share a store.
        own = str(getattr(model, "encoder_settings", ""))
        self.encoder_settings = ":".join(s for s in (own, str(encoder_settings)) if s)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        if encode_fn is None:
            from napari_sam.predictor import encode_image

            encode_fn = encode_image
        self._encode = encode_fn
        self._model_key = model_key
        self._lock = threading.RLock()
        self._memory: OrderedDict[int, Entry] = OrderedDict()
        self._pending: dict[int, threading.Event] = {}
        self._store: Path | None = None
        self._key: dict | None = None

    # -- public API ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_slices

    @property
    def spec(self) -> ModelSpec | None:
        """The model's spec, None for a model built by hand."""
        return getattr(self.model, "spec", None)

    @property
    def bytes_per_slice(self) -> int:
        """Memory taken by one slice's float32 embedding."""
        spec = self.spec
        side = spec.embedding_size if spec is not None else 64
        channels = getattr(getattr(self.model, "prompt_encoder", None), "embed_dim", 256)
        return int(channels) * side * side * 4

    @property
    def memory_bound_bytes(self) -> int:
        """Upper bound of the in-memory store in bytes."""
        return self.max_memory_slices * self.bytes_per_slice

    @property
    def store_path(self) -> Path | None:
        """Folder of this volume's on-disk store (created on first use), or None."""
        if self.cache_dir is None:
            return None
        return self._open_store()

    def key(self) -> dict:
        """The full cache key (what the manifest holds)."""
        with self._lock:
            if self._key is None:
                spec = self.spec
                if self._model_key is None:
                    self._model_key = weights_fingerprint(self.model)
                self._key = {
                    "format": FORMAT_VERSION,
                    "volume": {
                        "sha256": volume_fingerprint(self.volume),
                        "shape": list(self.volume.shape),
                        "dtype": self.volume.dtype.str,
                    },
                    "axis": self.axis,
                    "model": {
                        "name": getattr(spec, "name", type(self.model).__name__),
                        "image_size": getattr(spec, "image_size", None),
                        "preprocessing": getattr(spec, "preprocessing", None),
                        "weights_sha256": self._model_key,
                    },
                    "window": self.window.key() if self.window is not None else None,
                    "encoder_settings": self.encoder_settings,
                    "storage": "float16",
                }
            return self._key

    def slice_image(self, index: int) -> np.ndarray:
        """The 8-bit RGB image the encoder sees for slice ``index`` (``H x W x 3`` uint8)."""
        from napari_sam.intensity import to_rgb_uint8

        index = self._check_index(index)
        return to_rgb_uint8(np.take(self.volume, index, axis=self.axis), self.window)

    def get(self, index: int) -> Entry:
        """Embedding of slice ``index``, computed or loaded on first need.

        Returns
        -------
        embedding : Tensor, shape (1, 256, E, E), float32, on the model's device, in
            channels-last memory (read it, do not modify it: it is the cached tensor)
        original_size : (int, int)
            The slice's ``(H, W)``.
        input_size : (int, int)
            Its resized size inside the encoder frame.
        """
        index = self._check_index(index)
        while True:
            with self._lock:
                entry = self._memory.get(index)
                if entry is not None:
                    self._memory.move_to_end(index)
                    return entry
                event = self._pending.get(index)
                owner = event is None
                if event is None:
                    event = self._pending[index] = threading.Event()
            if not owner:
                # Another thread is computing this slice: wait, then take it from memory.
                event.wait()
                continue
            try:
                entry = self._load(index)
                if entry is None:
                    entry = self._compute(index)
                self._remember(index, entry)
                return entry
            finally:
                with self._lock:
                    del self._pending[index]
                event.set()

    def stored(self, index: int) -> bool:
        """Whether slice ``index`` is in the disk store and reads back intact (a full check)."""
        index = self._check_index(index)
        return self.cache_dir is not None and self._load(index) is not None

    def has(self, index: int) -> bool:
        """Whether slice ``index`` is available without encoding (in memory or on disk).

        Cheap: a stored file is not read here; one found damaged by :meth:`get` is recomputed.
        """
        index = self._check_index(index)
        with self._lock:
            if index in self._memory:
                return True
        return self.cache_dir is not None and self._slice_path(index).is_file()

    def cached_indices(self) -> list[int]:
        """Sorted indices available without encoding."""
        with self._lock:
            found = set(self._memory)
        if self.cache_dir is not None:
            for path in self._open_store().glob("slice_*.npz"):
                try:
                    found.add(int(path.stem.split("_", 1)[1]))
                except ValueError:
                    continue
        return sorted(i for i in found if 0 <= i < self.num_slices)

    def precompute(
        self, indices: Iterable[int] | None = None, cancel: Cancel = None
    ) -> Iterator[int]:
        """Make slices available, one at a time; yields each index when it is ready.

        Slices already in memory or on disk are not recomputed. Stop early by closing the
        generator or through ``cancel`` (a ``threading.Event`` or a callable returning True),
        checked before each slice. Without a ``cache_dir`` only the last ``max_memory_slices``
        slices stay available.
        """
        todo = range(self.num_slices) if indices is None else [int(i) for i in indices]
        for index in todo:
            index = self._check_index(index)
            if _is_cancelled(cancel):
                return
            if not self.has(index):
                self.get(index)
            yield index

    def clear_memory(self) -> None:
        """Drop the in-memory store (the disk store is kept)."""
        with self._lock:
            self._memory.clear()

    # -- internals ----------------------------------------------------------------------------

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"slice index must be an integer, got {index!r}")
        index = int(index)
        if not 0 <= index < self.num_slices:
            raise IndexError(
                f"slice {index} is outside the volume: axis {self.axis} has "
                f"{self.num_slices} slices (0..{self.num_slices - 1})"
            )
        return index

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")

    def _compute(self, index: int) -> Entry:
        embedding, input_size = self._encode(self.model, self.slice_image(index))
        embedding = embedding.detach().float()
        if self.cache_dir is not None:
            embedding = embedding.half().float()
        embedding = _token_layout(embedding)
        entry = (embedding, self.slice_shape, (int(input_size[0]), int(input_size[1])))
        if self.cache_dir is not None:
            self._save(index, entry)
        return entry

    def _remember(self, index: int, entry: Entry) -> None:
        if self.max_memory_slices == 0:
            return
        with self._lock:
            self._memory[index] = entry
            self._memory.move_to_end(index)
            while len(self._memory) > self.max_memory_slices:
                self._memory.popitem(last=False)

    # -- disk store ---------------------------------------------------------------------------

    def _open_store(self) -> Path:
        with self._lock:
            if self._store is not None:
                return self._store
            if self.cache_dir is None:
                raise RuntimeError("this cache has no cache_dir: it keeps embeddings in memory")
            key = self.key()
            text = json.dumps(key, sort_keys=True)
            folder = self.cache_dir / hashlib.sha256(text.encode()).hexdigest()[:32]
            folder.mkdir(parents=True, exist_ok=True)
            manifest = folder / MANIFEST
            content = json.dumps(key, indent=1).encode()
            # Loops only while peers race to create the same store; a few rounds settle it.
            for _ in range(20):
                state = _manifest_state(manifest, key)
                if state == "valid":
                    break
                # Unknown provenance: never use what is there.
                _wipe(folder)
                if state == "invalid":
                    _atomic_write(manifest, lambda f: f.write(content))
                    break
                if _create_exclusive(manifest, content):
                    break
            else:  # pragma: no cover - needs a peer rewriting the manifest for ever
                raise RuntimeError(
                    f"the embedding store {folder} keeps changing; is another "
                    "program writing a different manifest there?"
                )
            sweep_temporaries(folder)
            self._store = folder
            return folder

    def _slice_path(self, index: int) -> Path:
        return self._open_store() / f"slice_{index:05d}.npz"

    def _load(self, index: int) -> Entry | None:
        if self.cache_dir is None:
            return None
        path = self._slice_path(index)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                embedding = data["embedding"]
                original = tuple(int(s) for s in data["original_size"])
                input_size = tuple(int(s) for s in data["input_size"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        side = getattr(self.spec, "embedding_size", embedding.shape[-1])
        if (
            embedding.dtype != np.float16
            or embedding.ndim != 4
            or embedding.shape[0] != 1
            or embedding.shape[2:] != (side, side)
            or original != self.slice_shape
            or len(input_size) != 2
            or not np.isfinite(embedding).all()
        ):
            return None
        tensor = _token_layout(torch.from_numpy(embedding.astype(np.float32)).to(self._device()))
        return tensor, original, input_size

    def _save(self, index: int, entry: Entry) -> None:
        embedding, original, input_size = entry
        array = embedding.detach().cpu().half().numpy()

        def write(f: BinaryIO) -> None:
            np.savez(
                f,
                embedding=array,
                original_size=np.array(original, dtype=np.int64),
                input_size=np.array(input_size, dtype=np.int64),
            )

        self._write_slice(index, write, "embedding")

    def _write_slice(self, index: int, write: Callable[[BinaryIO], None], what: str) -> None:
        """Store one slice's file atomically; a full or read-only disk only costs the cache."""
        try:
            _atomic_write(self._slice_path(index), write)
        except OSError as exc:
            warnings.warn(
                f"could not store the {what} of slice {index} in {self.cache_dir}: {exc}; "
                "continuing without the disk cache for it",
                RuntimeWarning,
                stacklevel=4,
            )


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write through a temporary file of this writer in the same folder, then rename it.

    The rename replaces ``path`` atomically.
    """
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(path: Path, content: bytes) -> bool:
    """Create ``path`` holding ``content`` unless it exists; True when this call created it.

    The content is complete before the name appears (a hard link of a finished temporary file),
    so a concurrent reader never sees a partial file.
    """
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except FileNotFoundError:
            # A peer wiping the folder took the temporary file: try again.
            return False
        except OSError:
            # No hard links on this file system: exclusive creation, written in place.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(content)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _manifest_state(manifest: Path, key: dict) -> str:
    """``"valid"``, ``"missing"`` or ``"invalid"`` (another key, or unreadable)."""
    for attempt in range(3):
        try:
            found = json.loads(manifest.read_text())
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError):
            # Only a file system without hard links shows a manifest being written: wait.
            if attempt < 2:
                time.sleep(0.1)
            continue
        return "valid" if found == key else "invalid"
    return "invalid"


def _wipe(folder: Path) -> None:
    """Remove every finished file of a store and the temporaries of writers that are gone."""
    for entry in folder.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            entry.unlink(missing_ok=True)
    sweep_temporaries(folder)


# ".<target>.<host>~<pid>~<random>.tmp"; older stores used ".<target>.<random>.tmp".
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_-]+)~(?P<pid>\d+)~[0-9a-f]+\.tmp$")
STALE_TEMPORARY_SECONDS = 24 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_host()}~{os.getpid()}~{uuid.uuid4().hex}.tmp")


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no safe liveness probe (os.kill would end the process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def sweep_temporaries(folder: str | os.PathLike, max_age: float = STALE_TEMPORARY_SECONDS) -> int:
    """Remove temporary files of writers that died in ``folder``; returns how many.

    A temporary file is stale when its writer ran on this host and its process is gone, or,
    for files from another host (a network mount) or without a writer tag, when it is older
    than ``max_age`` seconds. A live writer's file is never touched.
    """
    removed = 0
    host, now = _host(), time.time()
    try:
        entries = list(os.scandir(Path(folder)))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        match = _TEMPORARY.match(name)
        try:
            if match and match["host"] == host and os.name == "posix":
                stale = not _process_alive(int(match["pid"]))
            else:
                stale = now - entry.stat().st_mtime > max_age
            if stale:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _token_layout(embedding: torch.Tensor) -> torch.Tensor:
    """The embedding in channels-last memory (same shape and values).

    Its ``E x E`` positions are then the decoder's image-token rows, read without a
    transposing pass on every prompt of every object (propagation decodes each slice once per
    object).
    """
    return embedding.contiguous(memory_format=torch.channels_last)
