"""The fast inference path: one call turns an exact model into a fast one.

::

    from napari_sam import load_model, SamPredictor
    from napari_sam.speed import optimize

    model = load_model("vit_b")          # exact float32, equal to Meta's implementation
    fast = optimize(model)               # same weights (shared), fast kernels, best precision
    predictor = SamPredictor(model, fast=True)   # the same thing through the predictor

The fast model (:class:`~napari_sam.speed.sam.FastSam`) is a :class:`~napari_sam.models.sam.Sam`
with the same interface and state dict; everything that takes a model (``SamPredictor``,
``EmbeddingCache``, propagation, ``SamAutomaticMaskGenerator``) takes it too. What it changes:

- image encoder: fused SDPA attention with the relative-position bias built a few heads at a
  time, no work on window padding, oneDNN-fused linear/convolution + bias + GELU (TinyViT: with
  BatchNorm folded, in channels-last memory), and a ``precision`` (below);
- mask decoder: the same mathematics re-associated around the few prompt tokens, the first
  layer's prompt-independent half computed once per image, the upscaling as fused GEMMs;
- masks: one bilinear resampling from the low-res logits to the image size (the exact path
  resamples twice through an ``S x S`` intermediate);
- memory: on Linux (glibc), freed heap memory stays in the process up to 256 MB, so the many
  4-16 MB temporaries of each call reuse pages instead of page-faulting on fresh ones
  (:mod:`napari_sam.speed.allocator`; ``NAPARI_SAM_MALLOC=default`` leaves malloc alone).

Precisions
----------
``"fp32"``
    Float32 throughout; equal to the exact path up to float rounding (about 1e-5).
``"int8"``
    The encoder's ``Linear`` layers in int8 with dynamic activation quantisation (CPU only; the
    other layers stay float32). About twice as fast per linear layer on a CPU with VNNI, but
    less exact: an explicit choice, never ``"auto"``.
``"bf16"``
    The encoder under ``torch.autocast`` to bfloat16: for CUDA GPUs, and CPUs with AMX.
``"auto"``
    What :func:`choose_precision` picks: the fastest that keeps masks at IoU >= 0.99 with the
    exact path on this project's agreement tests (``"fp32"`` on CPUs, ``"bf16"`` on CUDA).

SAM 2
-----
SAM 2 models have one fast precision, ``"bf16"``: :func:`optimize_sam2` (or
:func:`with_precision`) returns a :class:`~napari_sam.speed.sam2.FastSam2`, whose image encoder
and memory attention run under bfloat16 autocast with float32 outputs.
``"fp32"`` and ``"exact"`` are the model itself (its float32 path is already the exact one);
``"auto"`` is :func:`choose_sam2_precision`; ``"int8"`` is for SAM 1 only.

Embeddings from a fast model differ slightly from exact ones: cache them under
``FastSam.encoder_settings`` (``EmbeddingCache(..., encoder_settings=encoder_settings(model))``).
Whether a model (or any module) is a fast one: :func:`is_fast`; callers ask that, never the
class.

How the fast modules are made
-----------------------------
Every fast module is a *twin* of an exact one (:mod:`napari_sam.speed.twin`), made in one way:
``Twin.from_exact(exact, **settings)``. The twin starts with the exact module's parameters,
buffers, submodules and plain attributes, by reference and under the same names, so its state
dict is the exact module's; its ``speed_up(exact, **settings)`` then swaps the submodules that
have twins of their own (``FastSam`` -> encoder, prompt encoder and decoder twins; an encoder ->
block twins -> ``FusedLinear`` or ``DynamicInt8Linear`` twins of its ``nn.Linear`` layers) and
sets up weights derived on demand (:class:`~napari_sam.speed.kernels.DerivedWeights`). No twin
copies attributes by hand, and none has an ``__init__``.

The modules: :mod:`~napari_sam.speed.sam` (the model, prompt encoder, mask resizing),
:mod:`~napari_sam.speed.decoder` (the mask decoder, also used by automatic mask generation for
its grid of prompts), :mod:`~napari_sam.speed.upscaling` (the decoder's output upscaling),
:mod:`~napari_sam.speed.vit` and :mod:`~napari_sam.speed.tiny_vit` (the encoders),
:mod:`~napari_sam.speed.kernels` and :mod:`~napari_sam.speed.int8` (fused and int8 linear
layers), :mod:`~napari_sam.speed.windows`, :mod:`~napari_sam.speed.allocator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import nn

from napari_sam.speed.twin import is_fast

if TYPE_CHECKING:  # imported where used: importing napari_sam.speed stays cheap
    from napari_sam.speed.sam import FastSam

__all__ = [
    "INFERENCE_PRECISIONS",
    "PRECISIONS",
    "Capabilities",
    "FastSam",
    "capabilities",
    "check_precision",
    "choose_precision",
    "choose_sam2_precision",
    "encoder_settings",
    "is_fast",
    "optimize",
    "optimize_sam2",
    "with_precision",
]

Precision = Literal["auto", "fp32", "int8", "bf16"]
PRECISIONS = ("auto", "fp32", "int8", "bf16")
# What the widget and the command line offer: "exact" is the model as loaded (equal to Meta's).
INFERENCE_PRECISIONS = ("auto", "exact", "fp32", "int8", "bf16")

# Part of every fast model's cache key: bump it when the fast path's numerics change.
FAST_PATH_VERSION = 1


@dataclass(frozen=True)
class Capabilities:
    """What the fast path can use on one device.

    Attributes
    ----------
    device : str
        ``"cpu"``, ``"cuda"``, ``"mps"``...
    int8 : bool
        CPU int8 GEMM kernels (PyTorch's quantised ``linear_dynamic``) that work here.
    vnni : bool
        The CPU multiplies int8 without saturation (AVX-512 VNNI / AVX-VNNI).
    bf16 : bool
        The device computes in bfloat16 at all (CPU: AVX-512 BF16 or AMX).
    bf16_fast : bool
        bfloat16 is faster than float32 here: CUDA with bf16 support, or a CPU with AMX
        tiles. AVX-512 BF16 alone is not: its bf16 dot product has the throughput of float32
        FMA, and measured slower through PyTorch.
    fused_kernels : bool
        oneDNN's fused linear/convolution ops (CPU).
    """

    device: str
    int8: bool
    vnni: bool
    bf16: bool
    bf16_fast: bool
    fused_kernels: bool


def _cpu_flag(name: str) -> bool:
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def capabilities(device: str | torch.device = "cpu") -> Capabilities:
    """Probe what the fast path can use on ``device`` (cheap after the first call)."""
    device = torch.device(device)
    if device.type == "cpu":
        from napari_sam.speed.int8 import int8_available
        from napari_sam.speed.kernels import fused_conv_available, fused_linear_available

        amx = _cpu_flag("amx_tile")
        return Capabilities(
            device="cpu",
            int8=int8_available(),
            vnni=_cpu_flag("vnni"),
            bf16=_cpu_flag("avx512_bf16") or amx,
            bf16_fast=amx,
            fused_kernels=fused_linear_available() and fused_conv_available(),
        )
    if device.type == "cuda":
        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return Capabilities("cuda", False, False, bf16, bf16, False)
    return Capabilities(device.type, False, False, False, False, False)


def choose_precision(model: nn.Module, device: str | torch.device | None = None) -> str:
    """The precision ``"auto"`` means for ``model`` on ``device`` (default: the model's).

    The fastest precision that kept every mask of the agreement tests at IoU >= 0.99 with the
    exact path: ``"bf16"`` on CUDA with bf16 support (not measured here: no GPU), ``"fp32"``
    everywhere else. int8 is an explicit choice: 1.6x faster than fast float32 on the vit_b
    encoder here, but its masks fell to IoU 0.975 on the random-weight parity cases (see
    docs/performance.md). bf16 on CPUs is not chosen either: without AMX it measured slower
    than float32, and no AMX machine was available to measure it.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type == "cuda" and capabilities(device).bf16_fast:
        return "bf16"
    return "fp32"


def encoder_settings(model: object) -> str:
    """What a model's image embeddings depend on besides its weights ("" for exact models)."""
    return str(getattr(model, "encoder_settings", ""))


def optimize(model: nn.Module, precision: Precision | str = "auto") -> FastSam:
    """Return the fast twin of an exact :class:`~napari_sam.models.sam.Sam`.

    Parameters
    ----------
    model : Sam
        An exact model (anything else raises ``TypeError``) on the device it will run on
        (move it first: the int8 weights are packed for the CPU). It is not modified; the
        fast model shares its parameters.
    precision : {"auto", "fp32", "int8", "bf16"}
        See the module documentation.

    Returns
    -------
    FastSam
        In eval mode, inference only. ``fast.precision`` says what was chosen.

    Raises
    ------
    ValueError
        For an unknown precision, or one this device cannot run (int8 off the CPU or without
        int8 kernels, bf16 where the device has none).
    """
    from napari_sam.models.sam import Sam
    from napari_sam.speed.sam import FastSam

    if not isinstance(model, Sam):
        raise TypeError(f"optimize() takes a napari_sam Sam model, got {type(model).__name__}")
    if is_fast(model):
        fast = cast("FastSam", model)  # a fast Sam is a FastSam
        if precision in ("auto", fast.precision):
            return fast
        raise ValueError(
            f"this model is already a fast model ({fast.precision}); call optimize() on the "
            "exact model to get another precision"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    device = _model_device(model)
    if precision == "auto":
        precision = choose_precision(model, device)
    caps = capabilities(device)
    if precision == "int8" and not (device.type == "cpu" and caps.int8):
        raise ValueError(
            f"int8 needs a CPU and PyTorch's CPU int8 kernels; this model is on {device} "
            f"(int8 kernels {'found' if caps.int8 else 'missing'}). Use precision='auto'."
        )
    if precision == "bf16" and not caps.bf16:
        raise ValueError(f"{device} has no bfloat16 support; use precision='fp32' or 'auto'")

    if device.type == "cpu":
        from napari_sam.speed.allocator import keep_freed_memory

        keep_freed_memory()  # large temporaries reuse heap pages (see that module)
    return FastSam.from_exact(model, precision=precision)


def choose_sam2_precision(model: nn.Module, device: str | torch.device | None = None) -> str:
    """The precision ``"auto"`` means for a SAM 2 model on ``device`` (default: the model's).

    ``"bf16"`` where bfloat16 is faster than float32 (:attr:`Capabilities.bf16_fast`: a CPU
    with AMX tiles, or CUDA with bf16), ``"fp32"`` (the exact model) elsewhere. On AMX the
    bf16 tracking path measured 2x the float32 one with masks agreeing to 99.9 % of pixels
    (docs/performance.md, "SAM 2.1 tracking"); on CPUs with AVX-512 BF16 but no AMX, bf16
    GEMMs measured at about half the float32 rate in this project, so float32 stays.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    return "bf16" if capabilities(device).bf16_fast else "fp32"


def optimize_sam2(model: nn.Module, precision: str = "auto") -> nn.Module:
    """The SAM 2 model to run at ``precision``: the exact model, or its bfloat16 twin.

    Parameters
    ----------
    model : Sam2
        An exact SAM 2 model (not modified; a twin shares its parameters).
    precision : {"auto", "fp32", "bf16"}
        ``"fp32"``: ``model`` itself (the exact path is SAM 2's float32 path);
        ``"bf16"``: a :class:`~napari_sam.speed.sam2.FastSam2` (image encoder and memory
        attention under bfloat16 autocast, float32 outputs);
        ``"auto"``: :func:`choose_sam2_precision`.

    Returns
    -------
    nn.Module
        ``model`` or its twin, in eval mode; a twin's ``precision`` says what was chosen.

    Raises
    ------
    ValueError
        For ``"int8"`` (SAM 1 only), an unknown precision, bf16 on a device without it, or a
        model that is already a twin of another precision.
    """
    from napari_sam.speed.sam2 import FastSam2

    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(
            f"SAM 2 models take precision 'auto', 'fp32', 'bf16' or 'exact'; got {precision!r}"
        )
    if is_fast(model):
        current = str(getattr(model, "precision", ""))
        if precision in ("auto", current):
            return model
        raise ValueError(
            f"this model is already a fast model ({current}); call optimize_sam2() on the "
            "exact model to get another precision"
        )
    device = _model_device(model)
    if precision == "auto":
        precision = choose_sam2_precision(model, device)
    if precision == "fp32":
        return model
    if not capabilities(device).bf16:
        raise ValueError(f"{device} has no bfloat16 support; use precision='fp32' or 'auto'")
    return FastSam2.from_exact(model, precision=precision)


def check_precision(precision: str) -> None:
    """Raise ``ValueError``, naming the valid choices, for an unknown precision.

    The valid ones are :data:`INFERENCE_PRECISIONS`. Cheap: call it before loading a model.
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}; got {precision!r}"
        )


def with_precision(model: nn.Module, precision: str = "auto") -> nn.Module:
    """The model to run for a precision choice.

    ``"exact"`` -> ``model`` itself, else :func:`optimize` ``(model, precision)``.

    This is the one switch behind the widget's "Speed" choice and the command line's
    ``--precision``, which default to ``"auto"`` (the fastest path that keeps the masks of the
    exact one); the Python API stays exact unless asked.

    Raises
    ------
    ValueError
        For an unknown choice, with the valid ones; or as :func:`optimize`.
    """
    check_precision(precision)
    if getattr(getattr(model, "spec", None), "family", None) == "sam2":
        if precision == "exact":
            if is_fast(model):
                raise ValueError("this model is already a fast model; pass the exact model")
            return model
        return optimize_sam2(model, precision)
    if precision == "exact":
        if is_fast(model):
            raise ValueError("this model is already a fast model; pass the exact model instead")
        return model
    return optimize(model, precision)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def __getattr__(name: str) -> type:
    if name == "FastSam":
        from napari_sam.speed.sam import FastSam

        return FastSam
    raise AttributeError(f"module 'napari_sam.speed' has no attribute {name!r}")
