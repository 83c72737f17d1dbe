"""The widget's controls and their layout (no behaviour: see :mod:`.widget`)."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

__all__ = ["SamPanel"]


def _combo(*items: tuple[str, str]) -> QComboBox:
    combo = QComboBox()
    for text, data in items:
        combo.addItem(text, data)
    return combo


class SamPanel(QWidget):
    """Four groups: image and model, prompts, labels, volume; then a status line."""

    def __init__(self) -> None:
        super().__init__()
        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        self.checkpoint_button = QPushButton("Checkpoint…")
        self.checkpoint_button.setToolTip("Use a weights file (.pth, .pt, .safetensors)")
        self.download_button = QPushButton("Download")
        self.download_cancel_button = QPushButton("Cancel download")
        self.download_progress = QProgressBar()
        self.device_combo = QComboBox()
        self.speed_combo = QComboBox()
        self.speed_combo.setToolTip(
            "Fast: the same masks as the exact model, computed faster (the default). Exact: "
            "the numbers of Meta's implementation. int8: a quantised encoder, faster still on "
            "CPUs, with slightly different masks."
        )
        self.window_combo = QComboBox()
        self.axis_combo = QComboBox()

        self.sign_button = QPushButton("New points: positive (T)")
        self.next_mask_button = QPushButton("Next mask (N)")
        self.clear_button = QPushButton("Clear prompts (Shift+C)")
        self.everything_button = QPushButton("Segment everything on this slice")
        self.everything_button.setToolTip(
            "SAM's automatic masks (a grid of point prompts); each object gets a new label id"
        )

        self.labels_combo = QComboBox()
        self.label_mode_combo = _combo(("New label id", "new"), ("Selected label id", "selected"))
        self.overlap_combo = _combo(
            ("Keep existing labels", "keep"), ("Overwrite existing labels", "overwrite")
        )
        self.commit_button = QPushButton("Commit (C)")

        self.from_spin = QSpinBox()
        self.to_spin = QSpinBox()
        self.scope_combo = _combo(
            ("All committed objects", "all"), ("Selected label only", "selected")
        )
        self.propagate_button = QPushButton("Propagate (Shift+S)")
        self.cancel_button = QPushButton("Cancel")
        self.progress = QProgressBar()

        self.status = QLabel("Open an image to start.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        layout = QVBoxLayout(self)
        for group in (self._source(), self._prompts(), self._labels(), self._volume()):
            layout.addWidget(group)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.cancel_button.setEnabled(False)
        self.progress.setVisible(False)
        self.download_progress.setVisible(False)
        self.download_cancel_button.setVisible(False)

    def _source(self) -> QGroupBox:
        group = QGroupBox("Image and model")
        form = QFormLayout(group)
        form.addRow("Image", self.image_combo)
        form.addRow("Model", _row(self.model_combo, self.checkpoint_button))
        form.addRow(
            "", _row(self.download_button, self.download_progress, self.download_cancel_button)
        )
        form.addRow("Device", _row(self.device_combo, QLabel("Speed"), self.speed_combo))
        form.addRow("Intensity", self.window_combo)
        form.addRow("Slice axis", self.axis_combo)
        return group

    def _prompts(self) -> QGroupBox:
        group = QGroupBox("Prompts")
        box = QVBoxLayout(group)
        hint = QLabel(
            "Click in <b>SAM points</b> (T: negative), or draw a rectangle in <b>SAM boxes</b>. "
            "SAM runs on every change."
        )
        hint.setWordWrap(True)
        box.addWidget(hint)
        box.addLayout(_row(self.sign_button, self.next_mask_button, self.clear_button))
        box.addWidget(self.everything_button)
        return group

    def _labels(self) -> QGroupBox:
        group = QGroupBox("Labels")
        form = QFormLayout(group)
        form.addRow("Target", self.labels_combo)
        form.addRow("Label id", self.label_mode_combo)
        form.addRow("Overlap", self.overlap_combo)
        form.addRow(self.commit_button)
        return group

    def _volume(self) -> QGroupBox:
        group = QGroupBox("Volume")
        form = QFormLayout(group)
        form.addRow("Slices", _row(self.from_spin, QLabel("to"), self.to_spin))
        form.addRow("Objects", self.scope_combo)
        form.addRow(_row(self.propagate_button, self.cancel_button))
        form.addRow(self.progress)
        return group


def _row(first: QWidget, *others: QWidget) -> QHBoxLayout:
    """Widgets side by side, the first one stretching."""
    row = QHBoxLayout()
    row.addWidget(first, 1)
    for widget in others:
        row.addWidget(widget)
    return row
