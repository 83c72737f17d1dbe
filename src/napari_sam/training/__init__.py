"""Fine-tuning SAM models with simulated prompts, and the synthetic data of the test model.

- :mod:`~napari_sam.training.synthetic`: ellipses, blobs and ellipsoid volumes with known labels.
- :mod:`~napari_sam.training.prompt_sim`: simulated clicks, boxes and correction clicks.
- :mod:`~napari_sam.training.datasets`: sample sources (synthetic, 2D file pairs, NIfTI pairs).
- :mod:`~napari_sam.training.trainer`: :class:`Trainer` (a generator per step, resumable).
- :mod:`~napari_sam.training.evaluate`: held-out quality measures through ``SamPredictor``.

Example::

    from napari_sam import load_model
    from napari_sam.training import ImageFolder, TrainConfig, Trainer

    model = load_model("vit_b")
    trainer = Trainer(model, ImageFolder("my_data"), TrainConfig(steps=500, trainable="decoder"))
    for result in trainer.run(checkpoint="vit_b_tuned.safetensors"):
        print(result.step, result.loss)
"""

from napari_sam.training.datasets import ImageFolder, NiftiFolder, SyntheticSource, open_source
from napari_sam.training.synthetic import SceneConfig, TrainingSample
from napari_sam.training.trainer import StepResult, TrainConfig, Trainer

__all__ = [
    "ImageFolder",
    "NiftiFolder",
    "SceneConfig",
    "StepResult",
    "SyntheticSource",
    "TrainConfig",
    "Trainer",
    "TrainingSample",
    "open_source",
]
