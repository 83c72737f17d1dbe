"""Model specifications: what each SAM variant is, where its weights come from.

A :class:`ModelSpec` names everything needed to build a model and to fetch and verify its
weights. The spec is also serialised into checkpoints written by this package (training,
conversion), so that a file alone is enough to rebuild the model it holds.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["DEFAULT_MODEL", "MODELS", "ModelSpec", "custom_vit_spec", "get_spec"]

SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_HOMEPAGE = "https://github.com/facebookresearch/segment-anything"

EncoderKind = Literal["vit", "tiny_vit"]
Preprocessing = Literal["sam", "medsam"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one SAM variant and to obtain its weights.

    Parameters
    ----------
    name : str
        Registry key, e.g. ``"vit_b"``.
    encoder : {"vit", "tiny_vit"}
        Image-encoder family.
    encoder_kwargs : mapping
        Keyword arguments of the encoder's constructor besides ``img_size``
        (ViT: ``embed_dim``, ``depth``, ``num_heads``, ``global_attn_indexes``;
        TinyViT: ``embed_dims``, ``depths``, ``num_heads``, ``window_sizes``).
    image_size : int
        Side of the square encoder input in pixels (1024 for the official models). The
        embedding is ``image_size // 16`` on a side and the low-resolution masks are four
        times that.
    preprocessing : {"sam", "medsam"}
        ``"sam"``: resize the long side to ``image_size``, normalise with the pixel mean/std,
        pad bottom/right. ``"medsam"``: stretch to ``image_size`` squared, scale to [0, 1].
    url, filename, sha256, size_bytes, license
        Where the official weights live and how to verify them. ``url=None`` means no stable
        URL exists and the user supplies the file.
    homepage : str or None
        The project page that distributes the weights: where to get the file by hand when
        ``url`` is None or a download fails.
    test_fixture : bool
        True for the small model trained by this project on synthetic shapes only. Never a
        default.
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

    def __post_init__(self) -> None:
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {self.image_size}")
        if self.encoder not in ("vit", "tiny_vit"):
            raise ValueError(f"unknown encoder {self.encoder!r}; expected 'vit' or 'tiny_vit'")
        if self.preprocessing not in ("sam", "medsam"):
            raise ValueError(f"unknown preprocessing {self.preprocessing!r}")

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the official models)."""
        return self.image_size // 16

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits and of ``mask_input`` (256 officially)."""
        return 4 * self.embedding_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder_kwargs"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.encoder_kwargs.items()
        }
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
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
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelSpec:
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
        # Distributed through a file-sharing link without a stable URL: the user supplies it.
        url=None,
        filename="medsam_vit_b.pth",
        sha256=None,
        size_bytes=None,
        description=(
            "MedSAM (vit_b fine-tuned on 1.5 M medical image-mask pairs; box prompts). "
            "Download medsam_vit_b.pth from the MedSAM project page and pass it as the "
            "checkpoint, or put it in the model cache folder."
        ),
        homepage="https://github.com/bowang-lab/MedSAM",
    ),
]

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _OFFICIAL}
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
