"""Where slices are encoded: locally, or on the workers of a dask scheduler.

The choice is one more input of the session (:meth:`VolumeSession.set_encoding`, made by the
next job like a model change); the session owns the remote encoder and closes it when the choice
changes or the widget closes. The encoder reports its state from the worker thread that encodes,
so its messages cross into the main thread through a Qt signal before they reach the status
line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Signal

__all__ = ["LOCAL", "RemoteEncoding"]

LOCAL = "local"


class _StatusRelay(QObject):
    """Carries the encoder's status from any thread to the main thread."""

    message = Signal(str)


class RemoteEncoding:
    """Mixin of :class:`~.widget.SamWidget`: the "Encoding" field and its Retry button.

    Needs from the widget: ``backend``, ``session``, ``_prepared``, ``set_status``, ``timer``,
    ``request_segment``, ``_prompts_exist`` and the panel's ``encoding_edit`` /
    ``encoding_retry_button``.
    """

    def _init_encoding(self) -> None:
        self._encoding_relay = _StatusRelay()
        self._encoding_relay.message.connect(
            self.timer.wrap(self._on_encoding_status, "encoding_status")
        )
        self._encoding_applied = LOCAL
        self._status_note = ""
        problem = self.backend.cluster_unavailable()
        if problem:
            self.encoding_edit.setEnabled(False)
            self.encoding_edit.setToolTip(f"Remote encoding: {problem}")
            self.encoding_edit.setPlaceholderText("local (remote: install [cluster])")
            return
        self.encoding_edit.setText(os.environ.get("DASK_SCHEDULER_ADDRESS", ""))
        self._encoding_applied = self.encoding

    @property
    def encoding(self) -> str:
        """``"local"`` or the dask scheduler address typed in the Encoding field."""
        text = self.encoding_edit.text().strip()
        return LOCAL if text in ("", LOCAL) or not self.encoding_edit.isEnabled() else text

    def set_encoding(self, encoding: str) -> None:
        """Encode locally (``"local"``) or on the scheduler at ``encoding`` from the next job."""
        self.encoding_edit.setText("" if encoding == LOCAL else encoding)
        self._on_encoding_changed()

    def _encoding_setup(self, source: Any, device: str) -> dict:
        """The Setup fields of the encoding choice (for the chosen model ``source``)."""
        encoding, model_source = self.encoding, None
        if encoding != LOCAL:
            if isinstance(source, (str, Path)):
                from napari_sam.cluster.tasks import ModelSource

                model_source = ModelSource(str(source), device=device)
            else:
                # The workers cannot load a model that exists only in this process.
                self.set_status(
                    "Remote encoding needs a registry model or a weights file the workers can "
                    "read, not a model in memory: encoding locally.",
                    error=True,
                )
                encoding = LOCAL
        return dict(
            encoding=encoding,
            encoding_source=model_source,
            encoding_timeout=getattr(self.backend, "remote_timeout", 60.0),
            on_encoding_status=self._encoding_relay.message.emit,
        )

    def _on_encoding_changed(self, *_: object) -> None:
        encoding = self.encoding
        if encoding == self._encoding_applied:
            return
        self._encoding_applied = encoding
        self._prepared.encoding_key = None  # the next job makes the new encoder
        self.encoding_retry_button.setVisible(False)
        self._status_note = ""
        where = "on this machine" if encoding == LOCAL else f"on {encoding}"
        self.set_status(f"Slices will be encoded {where}.")
        if self._prompts_exist():
            self.request_segment()

    def retry_encoding(self) -> None:
        """Try the dask scheduler again for the next slice (after a fallback)."""
        encoder = self.session.encoder
        if encoder is None:
            return
        encoder.reconnect()
        self.encoding_retry_button.setVisible(False)
        self._status_note = ""
        self.set_status(f"Encoding: {encoder.address} is tried again for the next slice.")

    def _on_encoding_status(self, status: str) -> None:
        encoder = self.session.encoder
        address = self.encoding if encoder is None else encoder.address
        if status.startswith("local: "):
            self.encoding_retry_button.setVisible(True)
            # Kept under every later status line until Retry or another choice: the preview's
            # own message follows this one at once.
            self._status_note = (
                f"Remote encoding on {address} failed ({status[7:]}); encoding locally. "
                "Retry reconnects."
            )
            self.set_status(self._status_note, error=True)
        elif status.startswith("remote: "):
            self.encoding_retry_button.setVisible(False)
            self._status_note = ""
            self.set_status(f"Encoding on {address}.")
