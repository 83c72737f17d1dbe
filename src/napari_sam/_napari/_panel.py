"""The widget's controls and their layout (no behaviour: see :mod:`.widget`).

The panel is meant to sit beside napari's canvas without crowding it: short labels, sections
that fold away (a click on their title), and a vertical
scroll area instead of a tall minimum height. Long explanations live in tooltips.
"""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

__all__ = ["SamPanel", "Section"]

#: Widest a combo box asks to be, in characters: long entries are elided, not widening the dock.
COMBO_CHARS = 6


def _combo(*items: tuple[str, str], tooltip: str = "") -> QComboBox:
    combo = QComboBox()
    # Sized to a few characters, not to the longest entry (the popup still shows entries whole).
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(COMBO_CHARS)
    combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    for text, data in items:
        combo.addItem(text, data)
    if tooltip:
        combo.setToolTip(tooltip)
    return combo


def _spin(tooltip: str) -> QSpinBox:
    spin = QSpinBox()
    spin.setToolTip(tooltip)
    spin.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    spin.setMinimumWidth(0)
    return spin


def _line_edit() -> QLineEdit:
    edit = QLineEdit()
    # As narrow as the dock likes (QLineEdit asks for ~17 characters otherwise).
    edit.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    edit.setMinimumWidth(0)
    return edit


def _threshold(tooltip: str) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(0.0, 1.0)
    spin.setSingleStep(0.05)
    spin.setDecimals(2)
    spin.setToolTip(tooltip)
    spin.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    spin.setMinimumWidth(0)
    return spin


def _button(text: str, tooltip: str = "") -> QPushButton:
    button = QPushButton(text)
    button.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    button.setMinimumWidth(0)
    if tooltip:
        button.setToolTip(tooltip)
    return button


class Section(QWidget):
    """A titled group whose body folds away under a click on its title."""

    def __init__(self, title: str, *, expanded: bool = True) -> None:
        super().__init__()
        self.toggle = QToolButton()
        self.toggle.setText(title)
        self.toggle.setCheckable(True)
        self.toggle.setChecked(expanded)
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toggle.setStyleSheet("QToolButton { border: none; font-weight: bold; }")
        self.body = QWidget()
        self.form = QFormLayout(self.body)
        self.form.setContentsMargins(4, 0, 0, 0)
        self.form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.toggle)
        layout.addWidget(self.body)
        self.toggle.toggled.connect(self.set_expanded)
        self.set_expanded(expanded)

    def set_expanded(self, expanded: bool) -> None:
        self.toggle.setChecked(expanded)
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if expanded else Qt.ArrowType.RightArrow)
        self.body.setVisible(expanded)

    @property
    def expanded(self) -> bool:
        return self.body.isVisibleTo(self)


class SamPanel(QWidget):
    """Five sections: model, prompts, text prompt, labels, volume; then a status line, in a
    scroll area."""

    def __init__(self) -> None:
        super().__init__()
        self.image_combo = _combo()
        self.model_combo = _combo(tooltip="SAM model: registry weights, a file, or in memory")
        self.checkpoint_button = QPushButton("File…")
        self.checkpoint_button.setToolTip("Use a weights file (.pth, .pt, .safetensors)")
        self.download_button = _button("Download")
        self.download_cancel_button = _button("Cancel")
        self.download_cancel_button.setToolTip("Cancel the download")
        self.download_progress = QProgressBar()
        self.device_combo = _combo()
        self.device_combo.setMinimumContentsLength(4)
        self.speed_combo = _combo(
            tooltip=(
                "Fast: the same masks as the exact model, computed faster (the default). Exact: "
                "the numbers of Meta's implementation. int8: a quantised encoder, faster still "
                "on CPUs, with slightly different masks."
            )
        )
        self.speed_combo.setMinimumContentsLength(4)
        self.window_combo = _combo(tooltip="Intensity window: how voxel values become gray levels")
        self.axis_combo = _combo(tooltip="The axis SAM slices along")
        self.encoding_edit = _line_edit()
        self.encoding_edit.setPlaceholderText("local, or tcp://host:8786")
        self.encoding_edit.setToolTip(
            "Where slices are encoded: empty or 'local' on this machine, or the address of a "
            "dask scheduler whose workers encode them (prompting stays here). A lost "
            "connection falls back to local encoding; Retry reconnects."
        )
        self.encoding_retry_button = _button("Retry", "Try the dask scheduler again")
        self.encoding_retry_button.setVisible(False)

        self.sign_button = _button("positive (T)", "New points are positive; T toggles")
        self.next_mask_button = _button("Next (N)", "Show SAM's next mask for a single click")
        self.clear_button = _button("Clear (⇧C)", "Remove every prompt (Shift+C)")
        self.all_boxes_button = _button(
            "Segment all boxes",
            "Each box on this slice becomes its own object (a new label id each), committed "
            "as one undo step",
        )
        self.everything_button = _button(
            "Segment everything",
            "SAM's automatic masks on this slice (a grid of point prompts); each object gets "
            "a new label id",
        )

        self.text_edit = _line_edit()
        self.text_edit.setPlaceholderText("liver. kidney.")
        self.text_edit.setToolTip(
            "Text prompt: phrases separated by '.'. A detector finds boxes for them on this "
            "slice; they appear in SAM boxes, editable. Detectors trained on natural images "
            "are weak on CT and MRI: check every box."
        )
        self.find_boxes_button = _button("Find boxes", "Run the text detector on this slice")
        self.detector_combo = _combo(tooltip="The open-vocabulary box detector")
        self.detector_folder_button = QPushButton("Folder…")
        self.detector_folder_button.setToolTip("A detector folder written by save_pretrained")
        self.box_threshold_spin = _threshold("Keep boxes the detector scores above this")
        self.text_threshold_spin = _threshold("Keep boxes whose phrase scores above this")
        self.text_hint = QLabel()
        self.text_hint.setWordWrap(True)
        self.text_hint.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.text_hint.setVisible(False)

        self.labels_combo = _combo(
            tooltip="Target labels layer ('New labels layer': created on the first commit)"
        )
        self.label_mode_combo = _combo(("New id", "new"), ("Selected id", "selected"))
        self.label_mode_combo.setToolTip(
            "New id: each commit is a new object. Selected id: the label selected in the layer"
        )
        self.overlap_combo = _combo(("Keep", "keep"), ("Overwrite", "overwrite"))
        self.overlap_combo.setToolTip(
            "Keep: existing labels stay where the new mask overlaps them. Overwrite: the new "
            "mask wins"
        )
        self.commit_button = _button("Commit (C)", "Write the preview into the labels layer")

        self.from_spin = _spin("First slice to propagate into")
        self.to_spin = _spin("Last slice to propagate into")
        self.scope_combo = _combo(("All objects", "all"), ("Selected label", "selected"))
        self.scope_combo.setToolTip("Propagate every committed object or the selected label only")
        self.propagate_button = _button("Propagate (⇧S)", "Follow the objects through the volume")
        self.cancel_button = _button("Cancel", "Stop the running job")
        self.progress = QProgressBar()

        self.status = QLabel("Open an image to start.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)

        self.sections = {
            "model": self._source(),
            "prompts": self._prompts(),
            "text": self._text(),
            "labels": self._labels(),
            "volume": self._volume(),
        }
        content = QWidget()
        inner = QVBoxLayout(content)
        inner.setContentsMargins(4, 4, 4, 4)
        for section in self.sections.values():
            inner.addWidget(section)
        inner.addWidget(self.status)
        inner.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidget(content)
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.scroll)
        self.cancel_button.setEnabled(False)
        self.progress.setVisible(False)
        self.download_progress.setVisible(False)
        self.download_cancel_button.setVisible(False)

    def _source(self) -> Section:
        section = Section("Image and model")
        form = section.form
        form.addRow("Image", self.image_combo)
        form.addRow("Model", _row(self.model_combo, self.checkpoint_button))
        form.addRow(_row(self.download_button, self.download_progress, self.download_cancel_button))
        form.addRow("Device", self.device_combo)
        form.addRow("Speed", self.speed_combo)
        form.addRow("Window", self.window_combo)
        form.addRow("Axis", self.axis_combo)
        form.addRow("Encoding", self.encoding_edit)
        form.addRow(self.encoding_retry_button)
        return section

    def _prompts(self) -> Section:
        section = Section("Prompts")
        hint = QLabel("Click in <b>SAM points</b> or draw in <b>SAM boxes</b>.")
        hint.setWordWrap(True)
        hint.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        hint.setToolTip("SAM runs on every change; T makes new points negative")
        section.form.addRow(hint)
        section.form.addRow("Points", _row(self.sign_button, self.next_mask_button))
        section.form.addRow(self.clear_button)
        section.form.addRow(self.all_boxes_button)
        section.form.addRow(self.everything_button)
        return section

    def _text(self) -> Section:
        section = Section("Text prompt", expanded=False)
        form = section.form
        form.addRow(self.text_hint)
        form.addRow("Text", self.text_edit)
        form.addRow("Detector", _row(self.detector_combo, self.detector_folder_button))
        form.addRow("Box ≥", self.box_threshold_spin)
        form.addRow("Text ≥", self.text_threshold_spin)
        form.addRow(self.find_boxes_button)
        return section

    def _labels(self) -> Section:
        section = Section("Labels")
        form = section.form
        form.addRow("Target", self.labels_combo)
        form.addRow("Id", self.label_mode_combo)
        form.addRow("Overlap", self.overlap_combo)
        form.addRow(self.commit_button)
        return section

    def _volume(self) -> Section:
        section = Section("Volume")
        form = section.form
        form.addRow("From", self.from_spin)
        form.addRow("To", self.to_spin)
        form.addRow("Objects", self.scope_combo)
        form.addRow(_row(self.propagate_button, self.cancel_button))
        form.addRow(self.progress)
        return section

    def sizeHint(self):
        # The scroll area would ask for its content's full height; the width is what matters.
        hint = self.scroll.widget().sizeHint()
        hint.setWidth(hint.width() + self.scroll.verticalScrollBar().sizeHint().width())
        return hint


def _row(first: QWidget, *others: QWidget) -> QHBoxLayout:
    """Widgets side by side, the first one stretching."""
    row = QHBoxLayout()
    row.setSpacing(4)
    row.addWidget(first, 1)
    for widget in others:
        row.addWidget(widget)
    return row
