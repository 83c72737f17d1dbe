"""Committing and propagating: previews and SAM's objects into the target labels layer.

Every write goes through the widget's session, whose writer records napari's undo history: a
commit is one undo step, a whole propagation is one too, also when it is cancelled or fails
part-way (the slices it finished stay; each slice is written in one go, so there is never a
half-written slice; Ctrl+Z removes them all).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from napari_sam._napari._jobs import everything_job, propagate_job
from napari_sam._napari._slicing import SliceFrame
from napari_sam.volume.propagation import Step

__all__ = ["CommitAndPropagate"]


@dataclass
class _Propagation:
    labels: object
    mode: str
    history: contextlib.ExitStack
    written: set[int] = field(default_factory=set)


class CommitAndPropagate:
    """Mixin of :class:`~.widget.SamWidget`: commit (C), propagate (Shift+S), segment
    everything, cancel.

    Needs from the widget: ``session``, ``jobs``, ``result``, ``ensure_labels_layer``,
    ``attach_labels``, ``frame``/``current_index``, ``_start`` and the panel's controls.
    """

    def _init_commit(self) -> None:
        self._propagation: _Propagation | None = None

    def _target_labels(self, frame: SliceFrame):
        """The labels layer the session writes into for ``frame`` (created if "new"), or None
        with the reason shown."""
        labels = self.ensure_labels_layer()
        if tuple(labels.data.shape) != frame.shape:
            self.set_status(
                f"The labels layer {labels.name!r} has shape {labels.data.shape}, the image "
                f"{frame.shape}: choose a matching labels layer or 'New labels layer'.",
                error=True,
            )
            return None
        self.attach_labels(labels, frame)
        return labels

    def commit(self) -> None:
        """C: write the previewed mask into the target labels layer (one undo step)."""
        result = self._result
        if result is None or not result.mask.any():
            self.set_status("Nothing to commit: add prompts first.")
            return
        if self._propagation is not None:
            self.set_status("Wait for the propagation to end (or cancel it) before committing.")
            return
        try:
            labels = self._target_labels(result.frame)
            if labels is None:
                return
            label = None
            if self.label_mode_combo.currentData() == "selected":
                label = int(labels.selected_label)
            # Adding to the object's pixels (not replacing them) keeps what was painted there.
            label = self.session.add_mask(
                result.index,
                result.mask,
                label_id=label,
                mode=self.overlap_combo.currentData(),
                replace=False,
            )
        except ValueError as exc:
            self.set_status(str(exc), error=True)
            return
        labels.selected_label = label
        self.clear_prompts()
        self.set_status(
            f"Committed label {label} on slice {result.index}. Ctrl+Z in the labels layer "
            "undoes it."
        )

    def committed(self, frame: SliceFrame | None = None) -> dict[int, list[int]]:
        """Label id -> slices where it was committed (the session's objects), for the slicing
        ``frame`` (default the current one; {} when the session works on another)."""
        frame = frame or self.frame()
        labels = self.labels_layer
        if labels is None or self.session.volume is None:
            return {}
        if self.session.labels_key != self._labels_key(labels, frame):
            return {}
        return self.session.objects

    def _can_start(self, model: bool = False) -> bool:
        """Whether a button's job can start now (with a usable ``model``); if not, say why."""
        if self.jobs.busy:
            self.set_status("Busy: wait for the current job or cancel it.")
        elif self.image_layer is None:
            self.set_status("Open an image first.")
        elif model and self._model_ready_message():
            self.set_status(self._model_ready_message(), error=True)
        else:
            return True
        return False

    # -- propagation --------------------------------------------------------------------------

    def propagate(self) -> None:
        """Shift+S: propagate the committed objects through the volume (in the background)."""
        if not self._can_start():
            return
        if self._result is not None and self._result.mask.any():
            self.commit()  # the preview on screen is what the user means to propagate
        frame = self.frame()
        if frame.n_slices < 2:
            self.set_status("Propagation needs a volume: this image has a single slice.")
            return
        labels = self.labels_layer
        problem = self._model_ready_message()
        if labels is None or tuple(labels.data.shape) != frame.shape:
            problem = "Nothing to propagate: commit a mask (C) on a slice first."
        if problem:
            self.set_status(problem, error=True)
            return
        selected = None
        if self.scope_combo.currentData() == "selected":
            selected = [int(labels.selected_label)]
        lo, hi = sorted((self.from_spin.value(), self.to_spin.value()))
        history = contextlib.ExitStack()
        self._propagation = _Propagation(labels, self.overlap_combo.currentData(), history)
        # Painting now would join the propagation's undo step. (Not ``editable = False``: napari
        # clears a labels layer's whole undo history when it becomes read-only.)
        labels.mode = "pan_zoom"
        self.propagate_button.setEnabled(False)
        self.set_status(f"Propagating through slices {lo}-{hi}…")
        # Everything the session writes through this layer until the job ends: one undo step.
        history.enter_context(self._writer_for(labels, frame).undo_step())
        try:
            self._start(
                "propagate",
                propagate_job,
                selected,
                (lo, hi + 1),
                frame=frame,
                on_done=self._on_propagation_done,
            )
        except BaseException:
            self._propagation = None
            history.close()
            self.propagate_button.setEnabled(True)
            raise

    def _write_step(self, step: Step) -> None:
        run = self._propagation
        if run is None:
            return
        # Added to what is there (as commits are): a slice painted or committed stays.
        if self.session.write_step(step, mode=run.mode, replace=False):
            run.written.add(step.index)
        self.progress.setRange(0, max(step.total, 1))
        self.progress.setValue(step.done)
        self.set_status(f"Propagating: slice {step.index} ({step.done} of {step.total})…")

    def _on_propagation_done(self, aborted: bool) -> None:
        run, self._propagation = self._propagation, None
        if run is not None:
            run.history.close()  # everything written becomes one undo step
            n = len(run.written)
            if aborted:
                self.set_status(
                    f"Propagation cancelled: the {n} slice(s) changed so far stay "
                    "(Ctrl+Z in the labels layer removes them)."
                )
            elif self._job_error is None:
                self.set_status(
                    f"Propagation done: {n} slice(s) changed. Ctrl+Z in the labels layer undoes "
                    "it as one step."
                )
        self._busy(False)
        self.propagate_button.setEnabled(True)
        if self._pending:
            self.request_segment()

    # -- segment everything -------------------------------------------------------------------

    def segment_everything(self) -> None:
        """Every object SAM finds on the current slice, committed as new label ids (one undo
        step), in the background with progress and Cancel."""
        if not self._can_start(model=True):
            return
        frame = self.frame()
        self._start(
            "everything",
            everything_job,
            self.current_index(frame),
            frame=frame,
            on_return=lambda found: self._commit_everything(frame, *found),
            on_done=self._on_segment_done,
        )

    def _add_objects(self, frame: SliceFrame, index: int, found: np.ndarray) -> list[int] | None:
        """Write a label image of slice ``index`` as new objects (one undo step); the ids
        written, or None with the reason shown."""
        if self._target_labels(frame) is None:
            return None
        try:
            return self.session.add_objects(index, found, mode=self.overlap_combo.currentData())
        except ValueError as exc:
            self.set_status(str(exc), error=True)
            return None

    def _commit_everything(self, frame: SliceFrame, index: int, found: np.ndarray) -> None:
        added = self._add_objects(frame, index, found)
        if added is None:
            return
        ids = f" (labels {added[0]}-{added[-1]})" if added else ""
        self.set_status(
            f"Segment everything on slice {index}: SAM found {int(found.max())} object(s), "
            f"{len(added)} added{ids}. Ctrl+Z in the labels layer undoes it."
        )

    def cancel(self) -> None:
        """Stop the running job (propagation: finished slices stay)."""
        if self.jobs.busy:
            self.jobs.cancel()
            self.set_status("Cancelling…")
