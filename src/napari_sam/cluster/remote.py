"""Encoding on a dask cluster while prompting stays local.

The ``encode_fn`` made here plugs into :class:`~napari_sam.volume.embeddings.EmbeddingCache`
and :class:`~napari_sam.VolumeSession`.

The expensive step of SAM, encoding a slice, runs on a worker of a dask scheduler (a GPU worker
where there is one); the embedding comes back into the local cache, and every prompt after it is
decoded locally in milliseconds::

    from napari_sam.cluster.remote import remote_encoder
    encode = remote_encoder("tcp://gpu-box:8786", ModelSource("vit_h"))
    session = VolumeSession("ct.nii.gz", "vit_h", encode_fn=encode, cache_dir="~/sam-cache")

Workers load the model once each (:class:`ModelLoaderPlugin`, keyed by the model source and its
weights files), not per slice. Each remote embedding carries the worker model's weights hash
and encoder settings; one that differs from the local model's is refused, since the cache key
names the local model. When the scheduler cannot be reached, or is lost, slices are encoded
locally from then on: a warning says so and :attr:`RemoteEncoder.status` tells the caller (the
widget shows it); :meth:`RemoteEncoder.reconnect` tries the cluster again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from napari_sam.cluster import INSTALL_HINT
from napari_sam.cluster.tasks import Job, ModelLoader, ModelSource, TaskResult, run_job

if TYPE_CHECKING:
    from napari_sam.models.sam import Sam

try:
    from distributed import WorkerPlugin
except ImportError as exc:  # the [cluster] extra is missing
    raise ImportError(INSTALL_HINT) from exc

__all__ = [
    "PLUGIN_NAME",
    "ModelLoaderPlugin",
    "RemoteEncoder",
    "encode_on_worker",
    "register_model_loader",
    "remote_encoder",
    "run_job_on_worker",
]

PLUGIN_NAME = "napari-sam-models"
log = logging.getLogger(__name__)


class ModelLoaderPlugin(WorkerPlugin):
    """Worker plugin holding one :class:`ModelLoader` per worker process.

    ``torch_threads`` sets torch's intra-op threads on each worker (dask's nanny starts workers
    with ``OMP_NUM_THREADS=1``: one thread per worker process unless set here).
    """

    name = PLUGIN_NAME

    def __init__(self, max_models: int = 1, torch_threads: int | None = None) -> None:
        self.max_models = max_models
        self.torch_threads = torch_threads
        self.loader: ModelLoader | None = None

    def setup(self, worker: Any) -> None:
        """Give the worker its model loader (called by dask when the worker starts)."""
        self.loader = ModelLoader(self.max_models)
        if self.torch_threads:
            torch.set_num_threads(int(self.torch_threads))

    def teardown(self, worker: Any) -> None:
        """Drop the worker's models (called by dask when the worker closes)."""
        self.loader = None


def register_model_loader(client: Any, *, replace: bool = False, **plugin_options: Any) -> None:
    """Install :class:`ModelLoaderPlugin` on every worker of ``client``'s cluster.

    Workers that join later get it too.

    A plugin already installed with the default options is kept, with the models its workers
    loaded (a ViT-H takes seconds to load); options or ``replace=True`` install a new one.
    """
    if not replace and not plugin_options:
        name = PLUGIN_NAME
        if client.run_on_scheduler(lambda dask_scheduler: name in dask_scheduler.worker_plugins):
            return
    plugin = ModelLoaderPlugin(**plugin_options)
    register = getattr(client, "register_plugin", None) or client.register_worker_plugin
    register(plugin, name=PLUGIN_NAME)


def _worker_loader() -> ModelLoader:
    from distributed import get_worker

    # dask types its plugins as WorkerPlugin; ours (ModelLoaderPlugin) holds the loader.
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    loader: ModelLoader | None = getattr(plugin, "loader", None)
    if loader is None:
        raise RuntimeError(
            "the napari-sam model loader is not installed on this worker: call "
            "napari_sam.cluster.remote.register_model_loader(client) first"
        )
    return loader


def run_job_on_worker(job: Job) -> TaskResult:
    """The cluster form of :func:`~napari_sam.cluster.tasks.run_job` (the worker's models)."""
    return run_job(job, _worker_loader())


def encode_on_worker(
    source: ModelSource, image: np.ndarray
) -> tuple[np.ndarray, tuple[int, int], str, str]:
    """Encode one ``H x W x 3`` uint8 image with the worker's model.

    Returns the embedding (float32 ``1 x 256 x E x E``), the input size, and the weights hash
    and encoder settings of the model that made it.
    """
    from napari_sam.predictor import encode_image

    loaded = _worker_loader().get(source)
    embedding, input_size = encode_image(loaded.model, image)
    array = embedding.detach().float().cpu().contiguous().numpy()
    settings = str(getattr(loaded.model, "encoder_settings", ""))
    return array, (int(input_size[0]), int(input_size[1])), loaded.weights_sha256, settings


class RemoteEncoder:
    """An ``encode_fn(model, rgb_uint8) -> (embedding, input_size)`` running on dask workers.

    Parameters
    ----------
    address : str or distributed.Client
        Scheduler address (``"tcp://host:8786"``) or a connected client.
    source : ModelSource
        How workers load the same model as the local one (a registry name, or a checkpoint
        path that the workers can read). Its precision is replaced by the local model's on
        each call (exact for a plain model, the resolved precision of a fast one).
    timeout : float
        Seconds to wait for the scheduler when connecting and for one slice's embedding.
    resources : dict, optional
        Dask worker resources each encoding needs, e.g. ``{"GPU": 1}`` to use only workers
        started with ``--resources GPU=1``.
    on_status : callable, optional
        Called with :attr:`status` whenever it changes (the widget's status line).

    Attributes
    ----------
    status : str
        ``"remote: <address>"`` while the cluster encodes, ``"local: <reason>"`` after a
        fallback, ``"not connected"`` before the first slice.
    remote_slices, local_slices : int
        How many slices were encoded where.
    """

    def __init__(
        self,
        address: Any,
        source: ModelSource,
        *,
        timeout: float = 60.0,
        resources: dict[str, float] | None = None,
        on_status: Callable[[str], Any] | None = None,
    ) -> None:
        self.source = source
        self.timeout = float(timeout)
        self.resources = resources
        self.on_status = on_status
        self._given_client = not isinstance(address, str)
        self._client = None if isinstance(address, str) else address
        self.address = address if isinstance(address, str) else str(address.scheduler.address)
        self._lock = threading.Lock()
        self._local_key: tuple[int, str, str] | None = None
        self._fallback: str | None = None
        self._registered = False
        self.remote_slices = 0
        self.local_slices = 0
        self.status = "not connected"

    # -- encode_fn ------------------------------------------------------------------------------

    def __call__(self, model: Sam, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encode one ``H x W x 3`` uint8 slice image for ``model``.

        Returns
        -------
        embedding : Tensor, shape (1, 256, E, E), float32, on the model's device
        input_size : (int, int)
            The resized image's size inside the encoder frame.
        """
        if self._fallback is None:
            try:
                result = self._remote(model, image)
            except Exception as exc:  # any failure of the remote path: the user keeps working
                self._fall_back(exc)
            else:
                self.remote_slices += 1
                return result
        from napari_sam.predictor import encode_image

        self.local_slices += 1
        return encode_image(model, image)

    @property
    def remote(self) -> bool:
        """Whether slices are (still) sent to the cluster."""
        return self._fallback is None

    def reconnect(self) -> None:
        """Try the cluster again for the next slice (after a fallback)."""
        with self._lock:
            self._fallback = None
            if not self._given_client and self._client is not None:
                self._close_client()
        self._set_status("not connected")

    def close(self) -> None:
        """Disconnect (a client given by the caller stays open)."""
        with self._lock:
            if not self._given_client:
                self._close_client()

    # -- internals ------------------------------------------------------------------------------

    def _connect(self) -> Any:
        with self._lock:
            if self._client is None:
                from distributed import Client

                self._client = Client(self.address, timeout=self.timeout, set_as_default=False)
                register_model_loader(self._client)
            elif not self._registered:
                register_model_loader(self._client)
            self._registered = True
            return self._client

    def _close_client(self) -> None:
        client, self._client = self._client, None
        self._registered = False
        if client is not None:
            try:
                client.close(timeout=5)
            except Exception as exc:  # a lost scheduler may fail to say goodbye
                log.debug("closing the dask client failed: %s", exc)

    def _expected(self, model: torch.nn.Module) -> tuple[str, str]:
        key = self._local_key
        if key is None or key[0] != id(model):
            from napari_sam.volume.embeddings import weights_fingerprint

            key = (
                id(model),
                weights_fingerprint(model),
                str(getattr(model, "encoder_settings", "")),
            )
            self._local_key = key
        return key[1], key[2]

    def _remote(
        self, model: torch.nn.Module, image: np.ndarray
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        client = self._connect()
        # The workers run the local model's precision (a fast model's resolved choice: "auto"
        # may resolve differently on a GPU worker), so their embeddings share its cache key.
        source = dataclasses.replace(self.source, precision=getattr(model, "precision", None))
        future = client.submit(
            encode_on_worker,
            source,
            np.ascontiguousarray(image),
            pure=False,
            resources=self.resources,
        )
        try:
            array, input_size, weights, settings = self._wait(client, future)
        finally:
            future.release()
        want_weights, want_settings = self._expected(model)
        if weights != want_weights or settings != want_settings:
            raise ValueError(
                f"the workers' model ({self.source.model!r}, weights {weights[:12]}, settings "
                f"{settings!r}) differs from the local one (weights {want_weights[:12]}, "
                f"settings {want_settings!r}); give the workers the same weights and precision"
            )
        if self.status != f"remote: {self.address}":
            self._set_status(f"remote: {self.address}")
        device = next(model.parameters()).device
        return torch.from_numpy(array).to(device), input_size

    def _wait(self, client: Any, future: Any) -> Any:
        """The future's result; a lost scheduler is noticed within a quarter second.

        Not only at the end of the timeout: the client then says it is reconnecting.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return future.result(timeout=min(0.25, max(deadline - time.monotonic(), 0.01)))
            except TimeoutError:
                if client.status != "running":
                    raise ConnectionError(
                        f"lost the connection to the scheduler (client {client.status})"
                    ) from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no embedding within {self.timeout:g} s") from None

    def _fall_back(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        with self._lock:
            self._fallback = reason
            if not self._given_client:
                self._close_client()
        message = f"remote encoding on {self.address} failed ({reason}); encoding locally"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)
        self._set_status(f"local: {reason}")

    def _set_status(self, text: str) -> None:
        self.status = text
        if self.on_status is not None:
            self.on_status(text)


def remote_encoder(
    address: Any,
    model_source: ModelSource | str,
    *,
    timeout: float = 60.0,
    resources: dict[str, float] | None = None,
    on_status: Callable[[str], Any] | None = None,
    **source_options: Any,
) -> RemoteEncoder:
    """An ``encode_fn`` that encodes slices on the workers of the dask scheduler at ``address``.

    ``model_source`` is a :class:`ModelSource` or a model name/checkpoint path (then
    ``source_options``: ``checkpoint``, ``device``, ``precision`` as for ``ModelSource``). Pass
    the result as ``VolumeSession(..., encode_fn=...)`` or ``EmbeddingCache(encode_fn=...)``.
    Raises ImportError naming the ``[cluster]`` extra when distributed is not installed.
    """
    source = (
        model_source
        if isinstance(model_source, ModelSource)
        else ModelSource(str(model_source), **source_options)
    )
    return RemoteEncoder(address, source, timeout=timeout, resources=resources, on_status=on_status)
