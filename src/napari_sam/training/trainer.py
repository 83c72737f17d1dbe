"""The training loop: fine-tune a SAM model on (image, labels) samples with simulated prompts.

One step draws ``batch_size`` images, encodes them once, and decodes ``prompts_per_image``
prompt sets per image, each aimed at one object. Prompt sets follow SAM's interactive recipe:
a first prompt (one point -> three candidate masks, the best one trained; or a noisy box; or the
neighbouring slice's mask as a dense prompt, alone or with its box or an interior point), then
up to ``max_corrections`` correction clicks in the error region of the previous mask, each with
the previous low-resolution logits as the dense prompt half of the time. Loss: BCE + Dice on the
masks at the encoder's input resolution, plus the MSE of the IoU head against the true IoU.

Images go through exactly the inference preprocessing (``transform_for(spec).apply_image`` and
``Sam.preprocess``); dense prompts through :func:`napari_sam.prompts.mask_to_mask_input`.

:class:`Trainer` holds the state (model, optimiser, schedule, random generator, step) and
:meth:`Trainer.run` is a generator yielding one :class:`StepResult` per step, so a command line
can show a progress bar and a GUI can cancel by stopping the iteration.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.io.atomic import atomic_path
from napari_sam.prompts import mask_to_box, mask_to_mask_input
from napari_sam.training import prompt_sim
from napari_sam.training.synthetic import TrainingSample
from napari_sam.transforms import ResizeLongestSide, transform_for

if TYPE_CHECKING:
    from napari_sam.models.sam import Sam

__all__ = ["SampleSource", "StepResult", "TrainConfig", "Trainer", "state_path"]

Trainable = Literal["iou_head", "decoder", "decoder+prompt", "all"]


class SampleSource(Protocol):
    """Anything that draws training samples (synthetic generator, folder of files, volumes)."""

    def draw(self, rng: np.random.Generator) -> TrainingSample:
        """One sample, drawn with ``rng`` (the trainer's generator, for reproducible runs)."""
        ...


@dataclass
class TrainConfig:
    """Settings of one training run (saved beside every checkpoint).

    Attributes
    ----------
    steps : int
        Optimiser steps in total.
    batch_size : int
        Images per step (each encoded once).
    prompts_per_image : int
        Prompt sets (objects) decoded per image.
    lr, weight_decay : float
        AdamW learning rate (peak) and weight decay.
    warmup_steps : int
        Linear warm-up; then a cosine decay to ``min_lr_ratio * lr``.
    trainable : {"iou_head", "decoder", "decoder+prompt", "all"}
        What trains: the mask decoder's IoU head only (recalibrates the scores that pick one of
        the three masks, every mask stays as it was), the mask decoder (the usual fine-tuning),
        decoder and prompt encoder, or everything including the image encoder.
    max_corrections : int
        Largest number of correction clicks after the first prompt.
    p_box : float
        Probability that the first prompt is a box rather than one point.
    p_dense : float
        Probability that an object visible on the neighbouring slice gets that slice's mask as
        its first (dense) prompt.
    p_prev_logits : float
        Probability that a correction step also gets the previous logits as dense prompt.
    iou_weight : float
        Weight of the IoU-head MSE against the mask loss (BCE + Dice).
    grad_clip : float
        Largest gradient norm (0 disables clipping).
    seed : int
        Seeds the data, the prompts and torch.
    checkpoint_every : int
        Write a resumable checkpoint every that many steps (0: only at the end).
    bf16 : bool
        Run forward passes under bfloat16 autocast (weights and optimiser stay float32): about
        twice the matrix throughput on CPUs with AVX512-BF16 and on recent GPUs.
    """

    steps: int = 1000
    batch_size: int = 4
    prompts_per_image: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    trainable: Trainable = "decoder"
    max_corrections: int = 2
    p_box: float = 0.5
    p_dense: float = 0.7
    p_prev_logits: float = 0.5
    iou_weight: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.trainable not in ("iou_head", "decoder", "decoder+prompt", "all"):
            raise ValueError(
                "trainable must be 'iou_head', 'decoder', 'decoder+prompt' or 'all', "
                f"got {self.trainable!r}"
            )
        for name in ("steps", "batch_size", "prompts_per_image"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (field name -> value)."""
        return asdict(self)


@dataclass
class StepResult:
    """What one optimiser step reports."""

    step: int  # 1-based number of the step just taken
    loss: float
    mask_loss: float
    iou_loss: float
    lr: float
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class _Target:
    """One prompt set: an object of one image, in the encoder's S-frame."""

    image_index: int
    truth: np.ndarray  # S x S bool
    valid: tuple[int, int]  # (h, w) of the resized image inside the padded frame
    mode: str
    neighbour: np.ndarray | None = None  # S x S bool, neighbour slice's mask of the object
    mask_input: np.ndarray | None = None  # 1 x L x L logits from the neighbour's mask


def state_path(checkpoint: str | os.PathLike) -> Path:
    """Sidecar file holding the optimiser state and step beside a training checkpoint."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".train-state.pt")


def _frame_mask(
    mask: np.ndarray, transform: ResizeLongestSide, original_size: tuple[int, int]
) -> np.ndarray:
    """A mask at the image's size -> the padded S x S frame, resized as the image is."""
    side = transform.target_length
    h, w = transform.input_size(original_size)
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if (h, w) != tuple(original_size):
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    out = np.zeros((side, side), dtype=bool)
    out[:h, :w] = t[0, 0].numpy() >= 0.5
    return out


def _stack_present(arrays: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Stack one input of a prompt group: all its prompt sets have it, or none (one mode)."""
    present = [a for a in arrays if a is not None]
    if not present:
        return None
    if len(present) != len(arrays):
        raise ValueError("a prompt group mixes prompt sets with and without this input")
    return np.stack(present)


def _mask_losses(
    logits: torch.Tensor, fraction: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE + Dice of every mask (``n x M``) and, without gradient, each mask's true IoU.

    ``logits`` are ``n x M x L x L``; ``fraction`` (``n x 1 x L x L``) is the share of each
    low-resolution pixel inside the object. The true IoU, the IoU head's target, is measured as
    the predictor would: logits upscaled (bilinear) to the ``S x S`` frame, thresholded at 0,
    against ``truth`` (``n x 1 x S x S``) inside ``valid`` (the image, not its padding).
    """
    logits = logits.float()  # the loss in float32 also under bf16 autocast
    target = fraction.expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(-2, -1))
    prob = logits.sigmoid()
    inter = (prob * fraction).sum(dim=(-2, -1))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(-2, -1)) + fraction.sum(dim=(-2, -1)) + 1)
    with torch.no_grad():
        up = F.interpolate(logits, truth.shape[-2:], mode="bilinear", align_corners=False)
        pred = (up > 0) & valid
        inside = truth > 0
        hit = (pred & inside).sum(dim=(-2, -1)).float()
        union = (pred | inside).sum(dim=(-2, -1)).float()
        true_iou = hit / union.clamp(min=1)
    return bce + dice, true_iou


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


class Trainer:
    """Fine-tunes ``model`` on samples from ``source``.

    Parameters
    ----------
    model : Sam
        The model to train, in place (``model.spec`` is written into checkpoints).
    source : SampleSource
        Draws :class:`~napari_sam.training.synthetic.TrainingSample` objects.
    config : TrainConfig
    """

    def __init__(self, model: Sam, source: SampleSource, config: TrainConfig) -> None:
        self.model = model
        self.source = source
        self.config = config
        self.transform = transform_for(model)
        self.device = next(model.parameters()).device
        self.step = 0
        self.rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        self._trainable = self._select_trainable()
        if not self._trainable:
            raise ValueError(f"nothing to train with trainable={config.trainable!r}")
        # fused: one kernel for all parameters instead of a dozen small ops per tensor.
        self.optimizer = torch.optim.AdamW(
            self._trainable, lr=config.lr, weight_decay=config.weight_decay, fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _lr_factor(s, config)
        )

    # -- set-up -----------------------------------------------------------------------------

    # What each ``trainable`` setting trains, by parameter-name prefix (a subclass for another
    # model family names its own modules here).
    PARTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "iou_head": ("mask_decoder.iou_prediction_head",),
        "decoder": ("mask_decoder",),
        "decoder+prompt": ("mask_decoder", "prompt_encoder"),
        "all": ("mask_decoder", "prompt_encoder", "image_encoder"),
    }

    def _select_trainable(self) -> list[torch.nn.Parameter]:
        parts = self.PARTS[self.config.trainable]
        params = []
        for name, param in self.model.named_parameters():
            # A part is a module (its parameters) or one parameter (SAM 2's embeddings).
            train = any(name == part or name.startswith(part + ".") for part in parts)
            param.requires_grad_(train)
            if train:
                params.append(param)
        return params

    @property
    def encoder_trains(self) -> bool:
        """Whether the image encoder is trained too (``trainable="all"``)."""
        return self.config.trainable == "all"

    def _set_modes(self) -> None:
        self.model.train()
        # A frozen encoder stays in eval mode: batch-norm statistics (TinyViT) must not drift.
        if not self.encoder_trains:
            self.model.image_encoder.eval()

    # -- data ---------------------------------------------------------------------------------

    def _prepare(self, samples: list[TrainingSample]) -> tuple[torch.Tensor, list[_Target]]:
        cfg, rng, transform = self.config, self.rng, self.transform
        images = []
        targets: list[_Target] = []
        for index, sample in enumerate(samples):
            original = sample.labels.shape
            resized = transform.apply_image(sample.image)
            pixels = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)
            images.append(self.model.preprocess(pixels.to(self.device).float()))
            valid = resized.shape[:2]
            ids = np.unique(sample.labels)
            ids = ids[ids > 0]
            chosen = rng.choice(
                ids, cfg.prompts_per_image, replace=len(ids) < cfg.prompts_per_image
            )
            for label in chosen:
                truth = _frame_mask(sample.labels == label, transform, original)
                if not truth.any():
                    continue
                target = _Target(
                    index, truth, valid, "box" if rng.random() < cfg.p_box else "point"
                )
                if sample.neighbour is not None and rng.random() < cfg.p_dense:
                    near = sample.neighbour == label
                    if near.any():
                        target.neighbour = _frame_mask(near, transform, original)
                        target.mask_input = mask_to_mask_input(near, transform, original)
                        target.mode = str(
                            rng.choice(["dense", "dense+box", "dense+point"], p=[0.25, 0.5, 0.25])
                        )
                        if not target.neighbour.any():
                            target.mode = "dense"
                targets.append(target)
        return torch.stack(images).to(self.device), targets

    def _first_prompt(self, target: _Target) -> tuple[list, list, np.ndarray | None]:
        """Initial points (list of (x, y)), their labels, and box of one prompt set."""
        rng = self.rng
        s = self.transform.target_length
        if target.mode == "point":
            pick = prompt_sim.interior_point if rng.random() < 0.5 else prompt_sim.random_point
            return [pick(rng, target.truth)], [1], None
        if target.mode == "box":
            box = prompt_sim.jittered_box(
                rng, target.truth, noise=0.1, max_shift=20 * s / 1024, frame=target.valid
            )
            return [], [], box
        if target.mode in ("dense+box", "dense+point"):
            neighbour = target.neighbour
            if neighbour is None:
                raise ValueError(f"prompt mode {target.mode!r} needs the neighbour slice's mask")
            if target.mode == "dense+box":
                return [], [], mask_to_box(neighbour)
            return [prompt_sim.interior_point(rng, neighbour)], [1], None
        return [], [], None

    # -- one step -----------------------------------------------------------------------------

    def _decode(
        self,
        embeddings: torch.Tensor,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.model.prompt_encoder
        points = (coords, labels) if coords is not None and labels is not None else None
        sparse, dense = pe(points=points, boxes=boxes, masks=mask_input)
        # All four mask tokens: the single-mask token trains on multi-prompt sets, the three
        # ambiguity tokens on single clicks, and the IoU head on all of them.
        return self.model.mask_decoder.predict_masks(embeddings, pe.get_dense_pe(), sparse, dense)

    def _group_loss(
        self, embeddings: torch.Tensor, targets: list[_Target]
    ) -> tuple[torch.Tensor, torch.Tensor, int, list[float]]:
        """Run one prompt-mode group through its first prompt and its correction clicks."""
        cfg, rng = self.config, self.rng
        s = self.transform.target_length
        dev = self.device
        truth = torch.from_numpy(np.stack([t.truth for t in targets])).float()[:, None].to(dev)
        valid = torch.zeros_like(truth, dtype=torch.bool)
        for i, t in enumerate(targets):
            valid[i, 0, : t.valid[0], : t.valid[1]] = True
        # The loss is taken at the decoder's output resolution L = S / 4 against the fraction
        # of each L-pixel inside the object: 16 times cheaper than at S, and the soft target
        # still places the zero crossing (the mask's outline) with sub-pixel precision.
        fraction = F.avg_pool2d(truth, 4)
        first = [self._first_prompt(t) for t in targets]
        points = [list(p) for p, _, _ in first]
        point_labels = [list(lab) for _, lab, _ in first]
        boxes = None
        boxes_np = _stack_present([b for _, _, b in first])
        if boxes_np is not None:
            boxes = torch.from_numpy(boxes_np).to(dev)
        initial_mask = None
        masks_np = _stack_present([t.mask_input for t in targets])
        if masks_np is not None:
            initial_mask = torch.from_numpy(masks_np).to(dev)
        mask_input = initial_mask
        emb = embeddings[[t.image_index for t in targets]]

        n_steps = 1 + int(rng.integers(0, cfg.max_corrections + 1))
        mask_losses, iou_losses, ious_first = [], [], []
        coords: torch.Tensor | None
        labels: torch.Tensor | None
        for it in range(n_steps):
            if points[0]:
                coords = torch.tensor(np.array(points, dtype=np.float32), device=dev)
                labels = torch.tensor(point_labels, dtype=torch.int64, device=dev)
            else:
                coords = labels = None
            low, iou_pred = self._decode(emb, coords, labels, boxes, mask_input)
            per_mask, true_iou = _mask_losses(low, fraction, truth, valid)
            single_click = it == 0 and targets[0].mode == "point"
            if single_click:
                best = per_mask[:, 1:].argmin(dim=1) + 1
                mask_loss = per_mask.gather(1, best[:, None]).mean()
                chosen = iou_pred[:, 1:].argmax(dim=1) + 1  # what the user is shown
            else:
                mask_loss = per_mask[:, 0].mean()
                chosen = torch.zeros(len(targets), dtype=torch.int64, device=dev)
            mask_losses.append(mask_loss)
            iou_losses.append(F.mse_loss(iou_pred.float(), true_iou))
            if it == 0:
                ious_first = true_iou.gather(1, chosen[:, None])[:, 0].tolist()
            if it + 1 == n_steps:
                break
            # The next click corrects the mask shown to the user.
            shown_low = low.detach().gather(
                1, chosen[:, None, None, None].expand(-1, 1, *low.shape[-2:])
            )
            shown = F.interpolate(shown_low, (s, s), mode="bilinear", align_corners=False)[:, 0] > 0
            shown_np = (shown & valid[:, 0]).cpu().numpy()
            for i, t in enumerate(targets):
                click = prompt_sim.correction_click(rng, shown_np[i], t.truth)
                if click is None:
                    points[i].append(np.zeros(2, np.float32))
                    point_labels[i].append(-1)
                else:
                    points[i].append(click[0])
                    point_labels[i].append(click[1])
            if rng.random() < cfg.p_prev_logits:
                mask_input = shown_low
            else:
                mask_input = initial_mask
        return (
            torch.stack(mask_losses).mean(),
            torch.stack(iou_losses).mean(),
            len(targets),
            ious_first,
        )

    def train_step(self) -> StepResult:
        """Draw a batch, take one optimiser step, return its losses."""
        start = time.perf_counter()
        cfg = self.config
        self._set_modes()
        samples = [self.source.draw(self.rng) for _ in range(cfg.batch_size)]
        images, targets = self._prepare(samples)
        device_type = images.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, mask_loss, iou_loss, first_ious = self._batch_loss(images, targets)

        lr = self._optimise(loss)
        return StepResult(
            step=self.step,
            loss=float(loss.detach()),
            mask_loss=float(mask_loss),
            iou_loss=float(iou_loss),
            lr=lr,
            seconds=time.perf_counter() - start,
            extra={"first_prompt_iou": float(np.mean(first_ious)) if first_ious else 0.0},
        )

    def _optimise(self, loss: torch.Tensor) -> float:
        """Backpropagate ``loss`` and take one optimiser and schedule step; the lr it used."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._trainable, self.config.grad_clip)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return lr

    def _batch_loss(
        self, images: torch.Tensor, targets: list[_Target]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
        cfg = self.config
        with torch.set_grad_enabled(self.encoder_trains):
            embeddings = self.model.image_encoder(images)

        groups: dict[str, list[_Target]] = {}
        for t in targets:
            groups.setdefault(t.mode, []).append(t)
        total_mask = total_iou = torch.zeros((), device=self.device)
        count = 0
        first_ious: list[float] = []
        for mode in sorted(groups):
            mask_loss, iou_loss, n, ious = self._group_loss(embeddings, groups[mode])
            total_mask = total_mask + mask_loss * n
            total_iou = total_iou + iou_loss * n
            count += n
            first_ious.extend(ious)
        mask_loss = total_mask / max(count, 1)
        iou_loss = total_iou / max(count, 1)
        loss = mask_loss + cfg.iou_weight * iou_loss
        return loss, mask_loss.detach(), iou_loss.detach(), first_ious

    def run(self, checkpoint: str | os.PathLike | None = None) -> Iterator[StepResult]:
        """Train until ``config.steps``, yielding after every step.

        With ``checkpoint``, a resumable checkpoint is written every ``checkpoint_every`` steps
        and at the end. Stopping the iteration stops training after the current step.
        """
        while self.step < self.config.steps:
            result = self.train_step()
            if checkpoint is not None and self.checkpoint_due():
                self.save(checkpoint)
            yield result
        self.model.eval()

    def checkpoint_due(self) -> bool:
        """Whether :meth:`run` writes a checkpoint after the current step.

        Every ``checkpoint_every`` steps (never when it is 0), and after the last step.
        """
        every = self.config.checkpoint_every
        return self.step == self.config.steps or bool(every and self.step % every == 0)

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model (loader-readable, float32) and the training state beside it."""
        from napari_sam.weights import save_checkpoint

        path = save_checkpoint(self.model, path, spec=getattr(self.model, "spec", None))
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "numpy_rng": json.dumps(self.rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "config": json.dumps(self.config.to_dict()),
        }
        with atomic_path(state_path(path)) as tmp:
            torch.save(state, tmp)
        return path

    def load_state(self, checkpoint: str | os.PathLike) -> None:
        """Continue from a checkpoint written by :meth:`save` (weights, optimiser, step, data)."""
        from napari_sam.weights import load_state_dict_into, read_state_dict

        sidecar = state_path(checkpoint)
        if not sidecar.exists():
            raise FileNotFoundError(
                f"no training state beside {checkpoint} (expected {sidecar}); a checkpoint "
                "without it can start a new run (as the model to fine-tune) but not resume one"
            )
        state_dict, _ = read_state_dict(checkpoint)
        load_state_dict_into(self.model, state_dict)
        state = torch.load(sidecar, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.bit_generator.state = json.loads(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
