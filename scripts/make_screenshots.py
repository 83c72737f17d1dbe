"""Take the user guide's screenshots of the running widget (docs/images/*.png).

Drives napari as a user would: writes a synthetic volume as a NIfTI file (two ellipsoids in a
textured, noisy background, 2 mm slices of 0.8 mm pixels), opens it with the plugin's reader,
docks the Segment Anything widget, clicks one object, boxes the other, commits both, propagates
them through the volume, shows the result in 3D, saves the labels as NIfTI with the plugin's
writer and checks that the file lines up with the source. Headless, with Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshots.py

The model is a checkpoint file; the default is the small test model trained by this project on
synthetic shapes (tests/data/sam_test_tiny.safetensors), which is why the data are synthetic
too. With official weights (``--checkpoint sam_vit_b_01ec64.pth``) the same steps work on scans.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1500, 940)  # main window size in pixels
SPACING = (2.0, 0.8, 0.8)  # mm: slice thickness, then in-plane


def wait(app, widget, timeout: float = 600.0) -> None:
    """Let the widget's background job finish while Qt keeps drawing."""
    end = time.monotonic() + timeout
    while widget.jobs.busy or widget.pending:
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() > end:
            raise TimeoutError(f"the widget is still busy after {timeout} s")
    settle(app)


def settle(app, seconds: float = 0.5) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def shot(viewer, app, path: Path) -> None:
    from PIL import Image

    settle(app)
    image = np.asarray(viewer.screenshot(canvas_only=False, flash=False))
    Image.fromarray(image[..., :3]).save(path, optimize=True)
    print(f"wrote {path} ({image.shape[1]} x {image.shape[0]} pixels)")


def interior(mask: np.ndarray) -> tuple[int, int]:
    """The pixel deepest inside a mask (row, col): where a user would click."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(mask)
    return tuple(int(i) for i in np.unravel_index(np.argmax(depth), mask.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", default=str(ROOT / "tests" / "data" / "sam_test_tiny.safetensors")
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sam-screenshots-"))

    import napari
    import nibabel as nib
    from qtpy.QtWidgets import QApplication

    from napari_sam.io.nifti import image_from_display
    from napari_sam.training.synthetic import ellipsoid_volume

    volume, truth = ellipsoid_volume(np.random.default_rng(3), shape=(40, 160, 192), n_objects=2)
    scan = work / "synthetic.nii.gz"
    nib.save(image_from_display(volume, SPACING), scan)

    viewer = napari.Viewer(title="napari: Segment Anything for volumes")
    app = QApplication.instance()
    viewer.window.resize(*WINDOW)
    (image,) = viewer.open(scan, plugin="napari-sam-volumes")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-volumes", "Segment Anything")
    widget.set_checkpoint(args.checkpoint)
    settle(app, 1.0)

    def to_points(data_point):
        return widget.points_layer.world_to_data(image.data_to_world(data_point))

    # 1. One positive click inside object 1; SAM's best mask is previewed in cyan.
    first = truth == 1
    z1 = int(np.argmax(first.sum(axis=(1, 2))))
    viewer.dims.set_current_step(0, z1)
    viewer.reset_view()
    widget.points_layer.add(to_points([z1, *interior(first[z1])]))
    wait(app, widget)
    shot(viewer, app, out / "click-preview.png")

    # 2. Commit it (C), then a box around object 2 on its largest slice.
    widget.commit()
    second = truth == 2
    z2 = int(np.argmax(second.sum(axis=(1, 2))))
    rows, cols = np.nonzero(second[z2])
    r0, r1, c0, c1 = rows.min() - 3, rows.max() + 3, cols.min() - 3, cols.max() + 3
    viewer.dims.set_current_step(0, z2)
    corners = [[z2, r0, c0], [z2, r0, c1], [z2, r1, c1], [z2, r1, c0]]
    widget.boxes_layer.add([to_points(c) for c in corners], shape_type="rectangle")
    viewer.layers.selection.active = widget.boxes_layer
    wait(app, widget)
    shot(viewer, app, out / "box-preview.png")
    widget.commit()

    # 3. Propagate both objects through the volume (Shift+S): one undo step.
    viewer.layers.selection.active = widget.points_layer
    widget.propagate()
    wait(app, widget)
    both = np.minimum(first.sum(axis=(1, 2)), second.sum(axis=(1, 2)))
    both[[z1, z2]] = 0  # show a slice that propagation filled in, with both objects
    viewer.dims.set_current_step(0, int(np.argmax(both)))
    shot(viewer, app, out / "propagated.png")
    labels = widget.labels_layer
    for label in (1, 2):
        found, want = labels.data == label, truth == label
        dice = 2 * (found & want).sum() / (found.sum() + want.sum())
        print(f"object {label}: Dice {dice:.3f} against the synthetic truth")

    # 4. The same from napari's console: sam_session is the widget's scripting session.
    z3 = z1 + 3
    row, col = interior(first[z3])
    qt_viewer = viewer.window._qt_viewer  # the console has no public handle in napari 0.9
    qt_viewer.toggle_console_visibility()
    settle(app, 3.0)
    for line in (
        "sam_session.objects  # label id -> slices committed in the widget",
        f"mask = sam_session.segment_slice({z3}, points=[[{col}, {row}]], commit=False)",
        "print(mask.sum(), 'pixels in the preview of object 1 on another slice')",
    ):
        qt_viewer.console.execute(line)
        settle(app, 2.0)
    shot(viewer, app, out / "console.png")
    qt_viewer.toggle_console_visibility()

    # 5. The labels in 3D.
    widget.preview_layer.visible = False
    image.visible = False
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    camera = viewer.scene.camera
    camera.angles = (-15, 30, 150)
    camera.zoom *= 1.8
    shot(viewer, app, out / "labels-3d.png")

    # 6. Save with the plugin's writer; the file must overlay the scan voxel for voxel.
    saved = work / "synthetic_labels.nii.gz"
    labels.save(str(saved), plugin="napari-sam-volumes")
    source, result = nib.load(scan), nib.load(saved)
    same = np.allclose(source.affine, result.affine) and source.shape == result.shape
    print(f"saved {saved}: affine and shape equal to the scan's: {same}")
    viewer.close()


if __name__ == "__main__":
    main()
