"""The small SAM trained on synthetic shapes (a test fixture), for tests that need real masks.

``sam_test_tiny`` has SAM's real prompt encoder and mask decoder and a tiny ViT image encoder at
image size 256 (``model.spec.test_fixture`` is True). It was trained by
``scripts/train_test_model.py`` on synthetic ellipses, blobs and ellipsoid slices only (settings
and measured quality in ``tests/data/sam_test_tiny.json``): use it to check that the pipeline
segments correctly, never as a model for real images.

Usage in a test::

    from testmodel import load_test_model
    model = load_test_model()          # cached per process: treat it as read-only
    predictor = SamPredictor(model)

Synthetic images like those it knows come from ``napari_sam.training.synthetic``
(``synthetic_scene``, ``ellipsoid_volume``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
TEST_MODEL_PATH = DATA / "sam_test_tiny.safetensors"
TEST_MODEL_INFO = DATA / "sam_test_tiny.json"


@functools.lru_cache(maxsize=1)
def load_test_model():
    """The trained test fixture as a ``Sam`` in eval mode on the CPU (loaded once per process).

    Shared by all tests of a process: do not train it or change its weights in place (build
    your own copy with ``napari_sam.load_model(TEST_MODEL_PATH)`` for that).
    """
    if not TEST_MODEL_PATH.exists():
        raise FileNotFoundError(
            f"{TEST_MODEL_PATH} is missing; regenerate it with "
            "`nice -n 10 .venv/bin/python scripts/train_test_model.py` (about 30 minutes)"
        )
    from napari_sam.weights import load_model

    model = load_model(TEST_MODEL_PATH, device="cpu")
    model.requires_grad_(False)
    return model


def model_info() -> dict:
    """The recorded training settings and held-out metrics (tests/data/sam_test_tiny.json)."""
    return json.loads(TEST_MODEL_INFO.read_text())
