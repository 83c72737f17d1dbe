"""Model specifications: what each SAM variant is, where its weights come from.

A :class:`ModelSpec` names everything needed to build a model and to fetch and verify its
weights. The spec is also serialised into checkpoints written by this package (training,
conversion), so that a file alone is enough to rebuild the model it holds.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["DEFAULT_MODEL", "MODELS", "ModelSpec", "custom_vit_spec", "get_spec"]

SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_HOMEPAGE = "https://github.com/facebookresearch/segment-anything"

SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
SAM2_HOMEPAGE = "https://github.com/facebookresearch/sam2"

Family = Literal["sam", "sam2"]
EncoderKind = Literal["vit", "tiny_vit", "hiera"]
Preprocessing = Literal["sam", "medsam", "sam2"]
_ENCODERS = {"sam": ("vit", "tiny_vit"), "sam2": ("hiera",)}

SAM2_HEAD_DEFAULTS: dict[str, int] = {
    "d_model": 256,
    "memory_layers": 4,
    "memory_mlp_dim": 2048,
    "decoder_mlp_dim": 2048,
}
"""SAM 2.1's head widths (``ModelSpec.head_kwargs`` overrides them)."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one SAM variant and to obtain its weights.

    Parameters
    ----------
    name : str
        Registry key, e.g. ``"vit_b"``.
    encoder : {"vit", "tiny_vit", "hiera"}
        Image-encoder type (``"hiera"`` for the SAM 2 family).
    encoder_kwargs : mapping
        Keyword arguments of the encoder's constructor besides ``img_size``
        (ViT: ``embed_dim``, ``depth``, ``num_heads``, ``global_attn_indexes``;
        TinyViT: ``embed_dims``, ``depths``, ``num_heads``, ``window_sizes``;
        Hiera: ``embed_dim``, ``num_heads``, ``stages``, ``global_att_blocks``,
        ``window_spec``, ``window_pos_embed_bkg_spatial_size``).
    image_size : int
        Side of the square encoder input in pixels (1024 for the official models). The
        embedding is ``image_size // 16`` on a side and the low-resolution masks are four
        times that.
    preprocessing : {"sam", "medsam", "sam2"}
        ``"sam"``: resize the long side to ``image_size``, normalise with the pixel mean/std,
        pad bottom/right. ``"medsam"``: stretch to ``image_size`` squared, scale to [0, 1].
        ``"sam2"``: stretch to ``image_size`` squared, scale to [0, 1], normalise with the
        ImageNet mean/std (SAM 2 and MedSAM2).
    url, filename, sha256, size_bytes, license
        Where the official weights live and how to verify them. ``url=None`` means no stable
        URL exists and the user supplies the file.
    homepage : str or None
        The project page that distributes the weights: where to get the file by hand when
        ``url`` is None or a download fails.
    hub_repo, hub_revision, hub_files
        A Hugging Face Hub source (see :mod:`napari_sam.weights.hub`): repository id
        (``"wanglab/medsam-vit-base"``), the commit to pin, and the files to fetch mapped to
        their SHA-256 (None: not pinned, reported when downloaded). The files form a
        transformers-format checkpoint. Takes precedence over ``url`` for downloads; a file
        supplied by hand under ``filename`` in the cache folder is still used.
    test_fixture : bool
        True for the small model trained by this project on synthetic shapes only. Never a
        default.
    family : {"sam", "sam2"}
        ``"sam"``: SAM / MobileSAM / MedSAM (built by ``models.build.build_sam``).
        ``"sam2"``: SAM 2.1 and MedSAM2, with memory for tracking
        (``models.sam2.build.build_sam2``).
    head_kwargs : mapping
        Widths of the parts after the image encoder, for the SAM 2 family only (empty: SAM
        2.1's, as every released model has them): ``d_model`` (neck, prompt encoder, mask
        decoder and memory attention, 256), ``memory_layers`` (memory-attention layers, 4),
        ``memory_mlp_dim`` (their feed-forward width, 2048) and ``decoder_mlp_dim`` (the mask
        decoder transformer's, 2048). The SAM 2 test fixture is narrower to stay small.
    """

    name: str
    encoder: EncoderKind
    encoder_kwargs: Mapping[str, Any] = field(default_factory=dict)
    image_size: int = 1024
    preprocessing: Preprocessing = "sam"
    url: str | None = None
    filename: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    license: str = "Apache-2.0"
    description: str = ""
    homepage: str | None = None
    test_fixture: bool = False
    hub_repo: str | None = None
    hub_revision: str | None = None
    hub_files: Mapping[str, str | None] = field(default_factory=dict)
    family: Family = "sam"
    head_kwargs: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown_heads = set(self.head_kwargs) - set(SAM2_HEAD_DEFAULTS)
        if unknown_heads:
            raise ValueError(
                f"model {self.name!r}: unknown head_kwargs {sorted(unknown_heads)}; known: "
                f"{sorted(SAM2_HEAD_DEFAULTS)}"
            )
        if self.head_kwargs and self.family != "sam2":
            raise ValueError(f"model {self.name!r}: head_kwargs are for the SAM 2 family only")
        if self.family not in _ENCODERS:
            raise ValueError(f"unknown model family {self.family!r}; expected 'sam' or 'sam2'")
        step = 32 if self.family == "sam2" else 16
        if self.image_size % step:
            raise ValueError(f"image_size must be a multiple of {step}, got {self.image_size}")
        if self.encoder not in _ENCODERS[self.family]:
            expected = " or ".join(repr(e) for e in _ENCODERS[self.family])
            raise ValueError(
                f"unknown encoder {self.encoder!r} for family {self.family!r}; expected {expected}"
            )
        if self.preprocessing not in ("sam", "medsam", "sam2"):
            raise ValueError(f"unknown preprocessing {self.preprocessing!r}")
        if self.hub_repo is not None:
            if self.hub_repo.count("/") != 1 or not self.hub_files or not self.hub_revision:
                raise ValueError(
                    f"model {self.name!r}: a Hub source needs hub_repo 'owner/name', a "
                    "hub_revision and at least one file in hub_files"
                )
            for name, digest in self.hub_files.items():
                if digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                    raise ValueError(f"model {self.name!r}: {name} has no valid SHA-256")

    @property
    def downloadable(self) -> bool:
        """True when the weights can be fetched (a URL or a Hub source)."""
        return self.url is not None or self.hub_repo is not None

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the official models)."""
        return self.image_size // 16

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits and of ``mask_input`` (256 officially)."""
        return 4 * self.embedding_size

    @property
    def heads(self) -> dict[str, int]:
        """SAM 2 head widths: :data:`SAM2_HEAD_DEFAULTS` updated by ``head_kwargs``."""
        return {**SAM2_HEAD_DEFAULTS, **self.head_kwargs}

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain, JSON-serialisable values (tuples in ``encoder_kwargs`` as lists)."""
        d = dataclasses.asdict(self)
        d["encoder_kwargs"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.encoder_kwargs.items()
        }
        d["head_kwargs"] = dict(self.head_kwargs)
        return d

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text with sorted keys (embedded in checkpoint files)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; unknown fields raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model-spec fields {sorted(unknown)}")
        d = dict(d)
        # JSON turns tuples into lists; restore them so a round trip compares equal.
        d["encoder_kwargs"] = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in d.get("encoder_kwargs", {}).items()
        }
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with the given fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _vit(embed_dim: int, depth: int, num_heads: int, global_attn: tuple[int, ...]) -> dict:
    return {
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "global_attn_indexes": global_attn,
    }


def custom_vit_spec(
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: tuple[int, ...],
    image_size: int,
    window_size: int = 14,
    description: str = "",
) -> ModelSpec:
    """An unregistered ViT SAM, named by its sizes (``custom_vit_e768_d12_h12_s1024``).

    ``window_size`` is stored only when it differs from SAM's 14, so that specs recognised from
    files compare equal to the registry's.
    """
    kwargs: dict[str, Any] = _vit(embed_dim, depth, num_heads, tuple(global_attn_indexes))
    if window_size != 14:
        kwargs["window_size"] = window_size
    return ModelSpec(
        name=f"custom_vit_e{embed_dim}_d{depth}_h{num_heads}_s{image_size}",
        encoder="vit",
        encoder_kwargs=kwargs,
        image_size=image_size,
        license="unknown",
        description=description,
    )


TINY_VIT_5M = {
    "embed_dims": (64, 128, 160, 320),
    "depths": (2, 2, 6, 2),
    "num_heads": (2, 4, 5, 10),
    "window_sizes": (7, 7, 14, 7),
}

_OFFICIAL = [
    ModelSpec(
        name="vit_h",
        encoder="vit",
        encoder_kwargs=_vit(1280, 32, 16, (7, 15, 23, 31)),
        url=SAM_BASE_URL + "sam_vit_h_4b8939.pth",
        filename="sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        size_bytes=2_564_550_879,
        description="SAM ViT-H (641 M parameters), Meta AI: the most accurate, the slowest.",
        homepage=SAM_HOMEPAGE,
    ),
    ModelSpec(
        name="vit_l",
        encoder="vit",
        encoder_kwargs=_vit(1024, 24, 16, (5, 11, 17, 23)),
        url=SAM_BASE_URL + "sam_vit_l_0b3195.pth",
        filename="sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        size_bytes=1_249_524_607,
        description="SAM ViT-L (312 M parameters), Meta AI.",
        homepage=SAM_HOMEPAGE,
    ),
    ModelSpec(
        name="vit_b",
        encoder="vit",
        encoder_kwargs=_vit(768, 12, 12, (2, 5, 8, 11)),
        url=SAM_BASE_URL + "sam_vit_b_01ec64.pth",
        filename="sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size_bytes=375_042_383,
        description="SAM ViT-B (94 M parameters), Meta AI: the usual trade-off.",
        homepage=SAM_HOMEPAGE,
    ),
    ModelSpec(
        name="vit_t",
        encoder="tiny_vit",
        encoder_kwargs=TINY_VIT_5M,
        url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        filename="mobile_sam.pt",
        # No checksum is published for this file; the downloader reports the one it saw.
        sha256=None,
        size_bytes=40_728_226,
        description="MobileSAM (TinyViT-5M encoder, 10 M parameters): fastest on a CPU.",
        homepage="https://github.com/ChaoningZhang/MobileSAM",
    ),
    ModelSpec(
        name="medsam_vit_b",
        encoder="vit",
        encoder_kwargs=_vit(768, 12, 12, (2, 5, 8, 11)),
        preprocessing="medsam",
        # The original medsam_vit_b.pth has no stable URL; a hand-supplied copy in the cache
        # folder under this name is used first. Downloads come from the Hub, in transformers'
        # format (the same weights, renamed by weights/hf.py).
        url=None,
        filename="medsam_vit_b.pth",
        sha256=None,
        size_bytes=375_045_749,
        description=(
            "MedSAM (vit_b fine-tuned on 1.5 M medical image-mask pairs; box prompts), "
            "downloaded from the Hugging Face Hub (wanglab/medsam-vit-base, transformers "
            "format). Its revision and SHA-256 were taken from public projects that pin them "
            "and could not be checked against the Hub here; a mismatch is refused. Or put "
            "medsam_vit_b.pth from the MedSAM project page into the model cache folder."
        ),
        homepage="https://github.com/bowang-lab/MedSAM",
        hub_repo="wanglab/medsam-vit-base",
        hub_revision="de8488bca37bb1d4fb190f612c516126d739ce3b",
        # config.json is not fetched: the registry knows the architecture and the weights
        # file alone is a complete transformers checkpoint (weights/hf.py reads it from shapes).
        hub_files={
            "pytorch_model.bin": "0ef67838fba16f16c0e308eaf7a3ae6fbf4fe8e13d7a120ca932671ed9c47db0"
        },
    ),
]


def _hiera(
    embed_dim: int,
    num_heads: int,
    stages: tuple[int, ...],
    global_att: tuple[int, ...],
    window_spec: tuple[int, ...] = (8, 4, 14, 7),
    background: tuple[int, int] = (7, 7),
) -> dict:
    return {
        "embed_dim": embed_dim,
        "num_heads": num_heads,
        "stages": stages,
        "global_att_blocks": global_att,
        "window_spec": window_spec,
        "window_pos_embed_bkg_spatial_size": background,
    }


HIERA_TINY = _hiera(96, 1, (1, 2, 7, 2), (5, 7, 9))
_SAM2_NO_CHECKSUM = (
    " Meta publishes no checksum or byte size for this file; the downloader reports the "
    "sha256 it saw."
)


def _sam2(name: str, size: str, hiera: dict, file: str, params: str, note: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="sam2",
        encoder="hiera",
        encoder_kwargs=hiera,
        preprocessing="sam2",
        url=SAM2_BASE_URL + file,
        filename=file,
        sha256=None,
        size_bytes=None,
        description=f"SAM 2.1 Hiera-{size} ({params} parameters), Meta AI: {note}. "
        "Tracks an object through a volume's slices with memory." + _SAM2_NO_CHECKSUM,
        homepage=SAM2_HOMEPAGE,
    )


_SAM2 = [
    _sam2(
        "sam2.1_hiera_tiny",
        "T",
        HIERA_TINY,
        "sam2.1_hiera_tiny.pt",
        "39 M",
        "the fastest SAM 2.1 (about 150 MiB)",
    ),
    _sam2(
        "sam2.1_hiera_small",
        "S",
        _hiera(96, 1, (1, 2, 11, 2), (7, 10, 13)),
        "sam2.1_hiera_small.pt",
        "46 M",
        "about 180 MiB",
    ),
    _sam2(
        "sam2.1_hiera_base_plus",
        "B+",
        _hiera(112, 2, (2, 3, 16, 3), (12, 16, 20), background=(14, 14)),
        "sam2.1_hiera_base_plus.pt",
        "81 M",
        "about 310 MiB",
    ),
    _sam2(
        "sam2.1_hiera_large",
        "L",
        _hiera(144, 2, (2, 6, 36, 4), (23, 33, 43), window_spec=(8, 4, 16, 8)),
        "sam2.1_hiera_large.pt",
        "224 M",
        "the most accurate, the slowest (about 860 MiB)",
    ),
    ModelSpec(
        name="medsam2",
        family="sam2",
        encoder="hiera",
        encoder_kwargs=HIERA_TINY,
        image_size=512,
        preprocessing="sam2",
        # Distributed on the Hugging Face Hub (wanglab/MedSAM2, file MedSAM2_latest.pt), not
        # at a stable plain URL.
        url=None,
        filename="MedSAM2_latest.pt",
        sha256=None,
        size_bytes=None,
        description=(
            "MedSAM2 (SAM 2.1 Hiera-T fine-tuned on 455 k 3D medical image-mask pairs, "
            "512 x 512 input; CT/MR windowed to 0-255, stretched to 512, ImageNet "
            "normalisation). Get MedSAM2_latest.pt from the Hugging Face repository "
            "wanglab/MedSAM2 and pass it as the checkpoint, or put it in the model cache "
            "folder. No checksum is published."
        ),
        homepage="https://github.com/bowang-lab/MedSAM2",
    ),
]

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _OFFICIAL + _SAM2}
DEFAULT_MODEL = "vit_h"  # as in segment_anything's registry ("default" -> vit_h)


def get_spec(name: str) -> ModelSpec:
    """Return the spec registered under ``name`` (``"default"`` is ``vit_h``)."""
    if name == "default":
        name = DEFAULT_MODEL
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}"
        ) from None
