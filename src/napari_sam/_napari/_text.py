"""Text prompts in the widget: a detector's boxes for phrases land in SAM boxes, then SAM.

"Find boxes" runs the chosen open-vocabulary detector (Grounding DINO tiny, OWLv2, a folder)
in the background on the 8-bit slice SAM sees; each box it keeps becomes a rectangle in the
SAM boxes layer on the current slice, captioned with its phrase and score, editable like a
drawn box. The preview then shows SAM's mask for the best box (C commits it); "Segment all
boxes" makes every box on the slice its own object. The engine is :mod:`napari_sam.text`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import QFileDialog

from napari_sam._napari._backend import DETECTOR_CHOICES
from napari_sam._napari._jobs import boxes_job, detect_job
from napari_sam._napari._slicing import SliceFrame

if TYPE_CHECKING:  # pragma: no cover
    from napari_sam.text.detectors import Detections

__all__ = ["TextPrompts"]


class TextPrompts:
    """Mixin of :class:`~.widget.SamWidget`: the text prompt section and "Segment all boxes".

    Needs from the widget: ``backend``, ``session``, ``_boxes``, ``image_layer``, ``frame``/
    ``current_index``, ``_start``, ``_can_start``,
    ``_add_objects`` and the panel's controls.
    """

    def _init_text(self) -> None:
        for label, source in DETECTOR_CHOICES:
            self.detector_combo.addItem(label, source)
        self._on_detector_changed()
        problem = self.backend.text_unavailable()
        if problem:
            # The section stays visible so that users learn what to install.
            self.text_hint.setText(f"Text prompts need transformers: {problem}")
            self.text_hint.setVisible(True)
            for control in (
                self.text_edit,
                self.find_boxes_button,
                self.detector_combo,
                self.detector_folder_button,
                self.box_threshold_spin,
                self.text_threshold_spin,
            ):
                control.setEnabled(False)

    @property
    def detector_source(self) -> str:
        """The chosen detector: a short name (``"grounding-dino-tiny"``) or a folder."""
        return self.detector_combo.currentData()

    def set_detector(self, folder: str | Path) -> None:
        """Use the detector in ``folder`` (written by ``save_pretrained``)."""
        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            self.set_status(f"{folder} is not a detector folder (no config.json).", error=True)
            return
        self.detector_combo.addItem(f"folder: {folder.name}", str(folder))
        self.detector_combo.setCurrentIndex(self.detector_combo.count() - 1)

    def _choose_detector_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Text detector folder")
        if folder:
            self.set_detector(folder)

    def _on_detector_changed(self, *_: object) -> None:
        source = self.detector_source
        if source is None:
            return
        box, text = self.backend.detector_thresholds(source)
        self.box_threshold_spin.setValue(box)
        self.text_threshold_spin.setValue(text)

    # -- find boxes ---------------------------------------------------------------------------

    def find_boxes(self) -> None:
        """Run the text detector on the current slice (in the background, with Cancel)."""
        from napari_sam.text import parse_prompt

        # The detector reads the slice through the session's window and cache: a model first.
        if not self._can_start(model=True) or self._boxes is None:
            return
        try:
            phrases = parse_prompt(self.text_edit.text())
        except ValueError as exc:
            self.set_status(str(exc), error=True)
            return
        frame = self.frame()
        thresholds = (self.box_threshold_spin.value(), self.text_threshold_spin.value())
        self._start(
            "detect",
            detect_job,
            self.current_index(frame),
            phrases,
            self.detector_source,
            thresholds,
            frame=frame,
            on_return=lambda found: self._add_detections(frame, phrases, *found),
            on_done=self._on_segment_done,
        )

    def _add_detections(
        self, frame: SliceFrame, phrases: list[str], index: int, found: Detections
    ) -> None:
        if self._boxes is None or self.image_layer is None or frame != self.frame():
            return  # the image or its slicing changed while the detector ran
        if len(found) == 0:
            self.set_status(
                f"No box for {' '.join(phrases)!r} on slice {index} above box "
                f"{self.box_threshold_spin.value():.2f} / text "
                f"{self.text_threshold_spin.value():.2f}: lower the thresholds or draw a box "
                "(natural-image detectors are weak on CT and MRI)."
            )
            return
        # Worst first: the newest box is the one the preview shows, so it is the best one.
        order = list(range(len(found)))[::-1]
        self._quiet = True
        try:
            self._boxes.add_boxes(
                self.image_layer,
                frame,
                index,
                found.boxes[order],
                [found.phrases[k] for k in order],
                found.scores[order],
            )
        finally:
            self._quiet = False
        listed = ", ".join(f"{p.rstrip('.')} {s:.2f}" for p, s in zip(found.phrases, found.scores))
        more = " 'Segment all boxes' makes each its own object." if len(found) > 1 else ""
        self.set_status(
            f"Found {len(found)} box(es) on slice {index}: {listed}. The preview shows the "
            f"best; C commits it.{more}"
        )
        self.request_segment()

    # -- every box its own object -------------------------------------------------------------

    def segment_all_boxes(self) -> None:
        """Every shape in SAM boxes on the current slice becomes its own object (new label
        ids, best detector score first), committed as one undo step."""
        if not self._can_start(model=True) or self._boxes is None:
            return
        frame = self.frame()
        index = self.current_index(frame)
        found = self._boxes.each(self.image_layer, frame, index)
        if not found:
            self.set_status(f"No box on slice {index}: draw boxes or use Find boxes first.")
            return
        # Best detector score first (lowest id, wins overlaps), then drawn boxes in order.
        ranked = sorted(found, key=lambda item: -item[1] if item[1] == item[1] else np.inf)
        objects = [prompts for prompts, _ in ranked]
        self._start(
            "boxes",
            boxes_job,
            index,
            objects,
            frame=frame,
            on_return=lambda found: self._commit_boxes(frame, *found, boxes=len(objects)),
            on_done=self._on_segment_done,
        )

    def _commit_boxes(
        self, frame: SliceFrame, index: int, found: np.ndarray, *, boxes: int
    ) -> None:
        added = self._add_objects(frame, index, found)
        if added is None:
            return
        self.clear_prompts()
        ids = f" (labels {added[0]}-{added[-1]})" if added else ""
        self.set_status(
            f"Committed {len(added)} object(s) from {boxes} box(es) on slice {index}"
            f"{ids}. Ctrl+Z in the labels layer undoes it; Propagate follows them."
        )
