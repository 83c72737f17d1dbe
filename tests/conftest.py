"""Shared test configuration.

Tests run headless: GUI tests use a real napari viewer under Xvfb (see .ci/run). Each test module
keeps its own fixtures unless several modules need them: the small model specs and builders
below are shared (``from conftest import small_vit_spec`` where a module-level constant is
needed, the ``small_spec`` / ``small_sam`` fixtures otherwise).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from napari_sam.registry import ModelSpec

# Reference packages and helpers live beside the tests (tests/reference.py).
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("QT_API", "pyqt6")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_model_cache(tmp_path_factory, monkeypatch):
    """Keep every test away from the user's real model cache folder (and Hugging Face's)."""
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path_factory.mktemp("model-cache")))
    from huggingface_hub import constants  # read once at import, so patched, not set in env

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))


# --------------------------------------------------------------------------------------------
# Small models: real SAM code paths at a size a test can afford

#: A 64-wide, 2-block ViT (block 1 global): 4.8 M parameters, 0.8 M of them in the encoder.
SMALL_VIT_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,)}
#: A 32-wide, 1-block windowed ViT (4.7 M parameters): when only the shapes matter.
TINY_VIT_KWARGS = {"embed_dim": 32, "depth": 1, "num_heads": 2, "global_attn_indexes": ()}


def small_vit_spec(name: str = "small_vit", **changes) -> ModelSpec:
    """The small ViT SAM at 256 px (``custom_vit_e64_d2_h2_s256`` by its tensor shapes)."""
    spec = ModelSpec(name=name, encoder="vit", encoder_kwargs=SMALL_VIT_KWARGS, image_size=256)
    return spec.replace(**changes)


def tiny_vit_spec(name: str = "tiny_vit", **changes) -> ModelSpec:
    """The tiny ViT SAM at 64 px (a 4 x 4 embedding): choose ``image_size`` as needed."""
    spec = ModelSpec(name=name, encoder="vit", encoder_kwargs=TINY_VIT_KWARGS, image_size=64)
    return spec.replace(**changes)


def build_seeded(spec: ModelSpec, seed: int = 0):
    """``build_sam(spec)`` with the random initialisation of ``torch.manual_seed(seed)``."""
    import torch

    from napari_sam.models.build import build_sam

    torch.manual_seed(seed)
    return build_sam(spec)


@pytest.fixture(scope="session")
def small_spec() -> ModelSpec:
    """:func:`small_vit_spec` with its default name."""
    return small_vit_spec()


@pytest.fixture
def small_sam(small_spec):
    """A fresh small SAM (seed 0), the test's own to change."""
    return build_seeded(small_spec)
