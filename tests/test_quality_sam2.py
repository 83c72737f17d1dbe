"""Tracking quality of the trained SAM 2 fixture against the SAM 1 fixture's propagation.

Issue #14, item 5: on held-out synthetic ellipsoid volumes (a seed neither fixture trained on),
SAM 2 tracking through :func:`~napari_sam.volume.tracking.track_volume` (memory of the prompted
slice and of the last tracked slices, both directions) must reach a volume Dice >= 0.9 and at
least the Dice of SAM 1 propagation (each slice prompted by the previous slice's mask) on the
same volumes, both prompted by the object's true mask on its largest cross-section. Both run the
real code path; only the models are small.

Each volume holds a bright ellipsoid drawn on top (object 1) and a darker one (object 2). The
committed fixture keeps the bright one whatever its prompt says (docs/training.md, "The SAM 2
test fixture"), so it meets the bar following object 1 and fails it following the two in turn,
as the issue means it: that test is a strict expected failure, which turns red (and must be
made a plain test) once a fixture that tracks the prompted object is committed.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.training.evaluate import propagation_dice, tracking_cases, tracking_dice
from testmodel import load_sam2_test_model, load_test_model, model_info, sam2_model_info
from volume_helpers import one_torch_thread  # noqa: F401 (autouse fixture)

SEED = 4246  # held out: the fixtures trained on other seeds (asserted below)
N_VOLUMES = 8


def test_sam2_fixture_is_a_test_model_trained_on_other_seeds():
    model = load_sam2_test_model()
    assert model.spec.test_fixture and model.spec.family == "sam2"
    info = sam2_model_info()
    assert info["eval_seed"] == SEED
    assert SEED not in (info["train"]["seed"], model_info()["train"]["seed"])
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def _dice(follow: str) -> tuple[list[float], list[float]]:
    cases = tracking_cases(SEED, N_VOLUMES, follow=follow)
    sam2 = tracking_dice(load_sam2_test_model(), cases)
    sam1 = propagation_dice(load_test_model(), cases)
    print(
        f"follow={follow}: volume Dice, SAM 2 tracking: {np.round(sam2, 3)} mean "
        f"{np.mean(sam2):.3f}; SAM 1 propagation: {np.round(sam1, 3)} mean {np.mean(sam1):.3f}"
    )
    return sam2, sam1


def test_sam2_tracking_of_the_salient_object_beats_sam1_propagation():
    """The whole SAM 2 path (features, memory, both directions, stopping) on object 1."""
    sam2, sam1 = _dice("first")
    assert np.mean(sam1) >= 0.9  # the bar is a real one: SAM 1 propagation works here
    assert np.mean(sam2) >= 0.9
    assert np.mean(sam2) >= np.mean(sam1)
    assert min(sam2) >= 0.8


@pytest.mark.xfail(
    strict=True,
    reason="issue #14 item 5 open: the SAM 2 fixture keeps the salient ellipsoid whatever its "
    "prompt says (measured: tracking mean 0.520 following both objects in turn, SAM 1 "
    "propagation 0.925)",
)
def test_sam2_tracking_follows_the_prompted_object_and_beats_sam1_propagation():
    """The issue's bar, following object 1 and object 2 in turn."""
    sam2, sam1 = _dice("alternate")
    assert np.mean(sam1) >= 0.9
    assert np.mean(sam2) >= 0.9
    assert np.mean(sam2) >= np.mean(sam1)
    assert min(sam2) >= 0.8
