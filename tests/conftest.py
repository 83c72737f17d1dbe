"""Shared test configuration.

Tests run headless: GUI tests use a real napari viewer under Xvfb (see .ci/run). Each test module
keeps its own fixtures unless several modules need them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
