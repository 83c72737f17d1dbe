"""Prompts -> SAM -> preview: the widget's interactive loop on one slice."""

from __future__ import annotations

from dataclasses import replace

from napari_sam._napari._jobs import Result, segment_job
from napari_sam._napari._slicing import SliceFrame
from napari_sam._napari.prompt_layers import PromptLayer
from napari_sam.prompts import Prompts

__all__ = ["PromptPreview"]


class PromptPreview:
    """Mixin of :class:`~.widget.SamWidget`: reads the prompt layers, runs SAM on the current
    slice in the background (again when the prompts changed meanwhile), shows the chosen mask
    in the preview layer.

    Needs from the widget: ``session``, ``jobs``, ``frame``/``current_index``, ``_setup``, the
    prompt layer objects ``_points``/``_boxes``, ``_preview`` and the panel's buttons.
    """

    def _init_preview(self) -> None:
        self._result: Result | None = None
        self._pending = False
        self._quiet = False
        self._preview_at: tuple[SliceFrame, int] | None = None

    @property
    def result(self) -> Result | None:
        """SAM's answer for the current prompts (masks, predicted IoUs, logits, the mask on
        show), or None."""
        return self._result

    @property
    def pending(self) -> bool:
        """Whether SAM runs again once the current job ends (the prompts changed)."""
        return self._pending

    def _prompt_layers(self) -> list[PromptLayer]:
        return [p for p in (self._points, self._boxes) if p is not None]

    def _prompts_exist(self) -> bool:
        return any(len(p.layer.data) for p in self._prompt_layers())

    def _prompts_on(self, frame: SliceFrame, index: int) -> Prompts | None:
        prompts = Prompts()
        for p in self._prompt_layers():
            p.collect(prompts, self.image_layer, frame, index)
        return None if prompts.empty else prompts

    def _on_prompts_changed(self, source: PromptLayer, action: str) -> None:
        if not self._quiet:
            self.request_segment()

    def request_segment(self) -> None:
        """Run SAM on the current slice's prompts (in the background)."""
        if self.jobs.busy:
            self._pending = True
            return
        self._pending = False
        if self.image_layer is None or not self._prompt_layers():
            return
        if self.viewer.dims.ndisplay == 3:
            self.set_status("Switch to the 2D view to place prompts.")
            return
        frame = self.frame()
        index = self.current_index(frame)
        prompts = self._prompts_on(frame, index)
        if prompts is None:
            if self._result is not None and self._result.index == index:
                self._set_result(None)
            return
        if self._needs_download():
            # The first prompt fetches the chosen model (in the background, with Cancel);
            # SAM runs when it is there.
            self._segment_after_download = True
            if not self.downloads.busy:
                self.download()
            return
        problem = self._model_ready_message()
        if problem:
            self.set_status(problem, error=True)
            return
        previous = self._result
        mask_input = None
        if (
            previous is not None
            and previous.frame == frame
            and previous.index == index
            and prompts.extends(previous.prompts)
        ):
            mask_input = previous.low_res[previous.chosen][None]
        single_click = prompts.ambiguous
        self._start(
            "segment",
            segment_job,
            index,
            prompts,
            mask_input,
            single_click and mask_input is None,
            frame=frame,
            on_return=self._on_segmented,
            on_done=self._on_segment_done,
        )

    def _on_segmented(self, result: Result) -> None:
        try:
            current = self._prompts_on(result.frame, result.index)
            if self.image_layer is None or current is None:
                return
            if current.key() != result.prompts.key():
                self._pending = True  # prompts moved on while SAM ran
                return
        except ValueError:
            return
        self._set_result(result)

    def _on_segment_done(self, aborted: bool) -> None:
        self._busy(False)
        if aborted:
            self.set_status("Cancelled: nothing was written.")
        if self._pending:
            self.request_segment()

    def _set_result(self, result: Result | None) -> None:
        if result is None and self._result is None:
            return
        self._result = result
        self._draw_preview()
        if result is not None:
            n = len(result.masks)
            which = f"mask {result.chosen + 1} of {n}, " if n > 1 else ""
            area = int(result.mask.sum())
            self.set_status(
                f"Slice {result.index}: {which}predicted IoU {result.ious[result.chosen]:.2f}, "
                f"{area} pixels. C commits" + (", N shows the next mask." if n > 1 else ".")
            )

    def _draw_preview(self) -> None:
        layer = self._preview
        if layer is None:
            return
        changed = False
        if self._preview_at is not None:
            frame, index = self._preview_at
            if frame.shape == tuple(layer.data.shape):
                frame.slice_of(layer.data, index)[...] = 0
                changed = True
            self._preview_at = None
        result = self._result
        if result is not None and result.frame.shape == tuple(layer.data.shape):
            result.frame.slice_of(layer.data, result.index)[...] = result.mask
            self._preview_at = (result.frame, result.index)
            changed = True
        if changed:  # the extent never changes: skip napari's extent and highlight updates
            layer.refresh(extent=False, highlight=False)

    # -- actions (buttons and keys) -----------------------------------------------------------

    def toggle_sign(self) -> None:
        """T: new points become negative (or positive again); selected points flip too."""
        if self._points is None:
            return
        positive = self._points.toggle()
        self.sign_button.setText(f"{'positive' if positive else 'negative'} (T)")
        self.sign_button.setToolTip(
            f"New points are {'positive' if positive else 'negative'}; T toggles"
        )

    def next_mask(self) -> None:
        """N: show the next of SAM's candidate masks for an ambiguous single click."""
        result = self._result
        if result is None or len(result.masks) < 2:
            return
        self._set_result(replace(result, chosen=(result.chosen + 1) % len(result.masks)))

    def clear_prompts(self) -> None:
        """Shift+C: remove every prompt and the preview."""
        self._quiet = True
        try:
            for p in self._prompt_layers():
                p.clear()
        finally:
            self._quiet = False
        self._set_result(None)
        self.set_status("Prompts cleared.")
