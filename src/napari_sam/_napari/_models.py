"""The widget's model chooser: registry models, checkpoint files, models in memory, downloads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QWidget

__all__ = ["ModelChooser", "button_text"]


def button_text(text: str) -> str:
    """``text`` as a QPushButton/QAction shows it.

    Qt takes ``&`` as its mnemonic marker (and drops it), so it is doubled; nothing else in a
    label is special to Qt.
    """
    return text.replace("&", "&&")


class ModelChooser:
    """Mixin of :class:`~.widget.SamWidget`: the model chooser.

    It fills ``model_combo`` from the backend, adds checkpoint files and in-memory models, and
    downloads registry weights in the background.

    Needs from the widget: ``backend``, ``downloads`` (a JobRunner), ``timer``, the panel's
    model controls, ``set_status`` and ``request_segment``.
    """

    def _init_models(self) -> None:
        self._download_cancel = threading.Event()
        self._download_progress: tuple[int, int | None] = (0, None)
        self._segment_after_download = False
        self._model_options: dict[str, Any] = {}  # registry name -> ModelOption
        self._fill_models()
        self._update_download_button()
        # The mixin is always part of the widget, a QWidget (mypy sees only the mixin).
        self._download_timer = QTimer(cast(QWidget, self))
        self._download_timer.setInterval(100)
        self._download_timer.timeout.connect(
            self.timer.wrap(self._show_download_progress, "download_progress")
        )

    @property
    def model_source(self) -> Any:
        """The chosen model: a registry name, a checkpoint path, or a model object."""
        return self.model_combo.currentData()

    def _fill_models(self) -> None:
        """(Re)list the registry models with their state; files and models added stay."""
        combo = self.model_combo
        current = combo.currentData()
        items = [(combo.itemText(i), combo.itemData(i)) for i in range(combo.count())]
        extra = [(t, d) for t, d in items if not (isinstance(d, str) and d in self._model_options)]
        combo.blockSignals(True)
        combo.clear()
        self._model_options = {}
        for option in self.backend.model_options():
            combo.addItem(option.label, option.source)
            self._model_options[option.source] = option
        for text, source in extra:
            combo.addItem(text, source)
        for i in range(combo.count()):
            if combo.itemData(i) == current:
                combo.setCurrentIndex(i)
                break
        else:
            cached = [o for o in self._model_options.values() if o.cached]
            if cached:
                combo.setCurrentIndex(combo.findData(cached[0].source))
        combo.blockSignals(False)

    def set_checkpoint(self, path: str | Path) -> None:
        """Use the weights file ``path`` (any registry architecture or a saved checkpoint)."""
        path = Path(path).expanduser()
        if not path.is_file():
            self.set_status(f"No such checkpoint file: {path}", error=True)
            return
        self._add_model_item(f"file: {path.name}", str(path))

    def set_model(self, model: Any, name: str | None = None) -> None:
        """Use an already loaded model (e.g. from napari's console)."""
        self._add_model_item(f"in memory: {name or self.backend.model_name(model)}", model)

    def _add_model_item(self, label: str, source: Any) -> None:
        self.model_combo.addItem(label, source)
        self.model_combo.setCurrentIndex(self.model_combo.count() - 1)

    def _choose_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            cast(QWidget, self),
            "SAM checkpoint",
            "",
            "Checkpoints (*.pth *.pt *.safetensors);;All files (*)",
        )
        if path:
            self.set_checkpoint(path)

    def _option(self) -> Any:  # a ModelOption or None
        source = self.model_source
        return self._model_options.get(source) if isinstance(source, str) else None

    def _needs_download(self) -> bool:
        option = self._option()
        return option is not None and not option.cached and option.downloadable

    def _model_ready_message(self) -> str | None:
        """Why no model can be used now (not downloaded, none chosen), or None."""
        source = self.model_source
        if source is None:
            return "Choose a model, or a checkpoint file with Checkpoint…"
        option = self._option()
        if option is not None and not option.cached:
            if option.downloadable:
                size = "" if option.size_bytes is None else f" ({option.size_bytes / 1e6:,.0f} MB)"
                return f"{source} is not downloaded yet: press Download{size} first."
            return f"{source} has no download link: choose its file with Checkpoint…"
        return None

    # -- download -----------------------------------------------------------------------------

    def _set_download_visible(self, running: bool) -> None:
        self.download_progress.setVisible(running)
        self.download_cancel_button.setVisible(running)

    def _update_download_button(self) -> None:
        option = self._option()
        needed = self._needs_download()
        self.download_button.setVisible(needed and not self.downloads.busy)
        if needed:
            size = "" if option.size_bytes is None else f" {option.size_bytes / 1e6:,.0f} MB"
            self.download_button.setText(button_text(f"Download {option.source}{size}"))
            self.download_button.setToolTip(f"Download the weights of {option.source}")

    def download(self) -> None:
        """Download the chosen registry model in the background (progress, cancel)."""
        source = self.model_source
        if self.downloads.busy or not isinstance(source, str):
            return
        self._download_cancel.clear()
        self._download_progress = (0, None)
        self.download_button.setVisible(False)
        self._set_download_visible(True)
        self._download_timer.start()
        self.set_status(f"Downloading {source}…")

        def report(done: int, total: int | None) -> None:
            self._download_progress = (done, total)  # read by the main thread's timer

        self.downloads.start(
            "download",
            self.backend.download,
            source,
            report,
            self._download_cancel.is_set,
            on_return=lambda path: self.set_status(f"Downloaded {source} to {path}."),
            on_error=self._on_download_error,
            on_done=self._on_download_done,
        )

    def _show_download_progress(self) -> None:
        done, total = self._download_progress
        if total:
            self.download_progress.setRange(0, 1000)
            self.download_progress.setValue(int(1000 * done / total))
        else:
            self.download_progress.setRange(0, 0)

    def _on_download_error(self, exc: BaseException) -> None:
        self._segment_after_download = False
        if self.backend.is_cancelled_error(exc):
            self.set_status("Download cancelled; nothing was kept.")
        else:
            self.set_status(f"Download failed: {exc}", error=True)

    def _on_download_done(self, aborted: bool) -> None:
        self._download_timer.stop()
        self._set_download_visible(False)
        self._fill_models()
        self._update_download_button()
        if self._segment_after_download and not self._needs_download():
            self._segment_after_download = False
            self.request_segment()
