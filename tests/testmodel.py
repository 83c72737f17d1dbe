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

``sam2_test_tiny`` (``load_sam2_test_model()``) is its SAM 2 counterpart: a narrow SAM 2.1 with
memory, trained by ``scripts/train_sam2_test_model.py`` on 8-frame clips of the same synthetic
ellipsoid volumes (``tests/data/sam2_test_tiny.json``), for tests of SAM 2 tracking quality.

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
SAM2_TEST_MODEL_PATH = DATA / "sam2_test_tiny.safetensors"
SAM2_TEST_MODEL_INFO = DATA / "sam2_test_tiny.json"


def _load_fixture(path: Path, script: str, duration: str):
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; regenerate it with "
            f"`nice -n 10 .venv/bin/python {script}` (about {duration})"
        )
    from napari_sam.weights import load_model

    model = load_model(path, device="cpu")
    model.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=1)
def load_test_model():
    """The trained test fixture as a ``Sam`` in eval mode on the CPU (loaded once per process).

    Shared by all tests of a process: do not train it or change its weights in place (build
    your own copy with ``napari_sam.load_model(TEST_MODEL_PATH)`` for that).
    """
    return _load_fixture(TEST_MODEL_PATH, "scripts/train_test_model.py", "30 minutes")


def model_info() -> dict:
    """The recorded training settings and held-out metrics (tests/data/sam_test_tiny.json)."""
    return json.loads(TEST_MODEL_INFO.read_text())


@functools.lru_cache(maxsize=1)
def load_sam2_test_model():
    """The trained SAM 2 fixture ``sam2_test_tiny`` as a ``Sam2`` in eval mode on the CPU.

    A narrow SAM 2.1 (Hiera widths 32-256, heads 128 wide, input 256) trained by
    ``scripts/train_sam2_test_model.py`` on synthetic ellipsoid volumes only. Loaded once per
    process and shared: treat it as read-only.
    """
    return _load_fixture(SAM2_TEST_MODEL_PATH, "scripts/train_sam2_test_model.py", "80 minutes")


def sam2_model_info() -> dict:
    """Training settings and held-out metrics of the SAM 2 fixture (sam2_test_tiny.json)."""
    return json.loads(SAM2_TEST_MODEL_INFO.read_text())
