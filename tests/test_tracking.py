"""VolumeTracker control flow with a fake SAM 2 model (parity lives in test_tracking_parity.py).

The fake model's "features" of a slice are the slice's true object mask at ``S/4``, and its
``track_step`` answers that mask: it checks, as SAM 2 would fail to, that every memory it reads
is there, and records what it was asked, so the tests can count work and held memories.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_sam.volume.sam2_features import FeatureCache
from napari_sam.volume.tracking import Prompt, TrackStep, VolumeTracker, track_volume

S = 32  # fake model input size: masks are 8 x 8
Z, H, W = 12, 24, 16


class FakeSam2:
    image_size = S
    num_maskmem = 4
    memory_temporal_stride_for_eval = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool, bool]] = []  # (slice, init, reverse)
        self.memory_encodings = 0
        self.most_memories_held = 0

    def _prepare_backbone_features(self, backbone_out):
        feats = [x.flatten(2).permute(2, 0, 1) for x in backbone_out["backbone_fpn"]]
        pos = [x.flatten(2).permute(2, 0, 1) for x in backbone_out["vision_pos_enc"]]
        sizes = [tuple(x.shape[-2:]) for x in backbone_out["backbone_fpn"]]
        return backbone_out, feats, pos, sizes

    def _encode_new_memory(
        self,
        current_vision_feats,
        feat_sizes,
        pred_masks_high_res,
        object_score_logits,
        is_mask_from_pts,
    ):
        self.memory_encodings += 1
        return torch.ones(1, 2, 2, 2), [torch.zeros(1, 2, 2, 2)]

    def track_step(
        self,
        frame_idx,
        is_init_cond_frame,
        current_vision_feats,
        current_vision_pos_embeds,
        feat_sizes,
        point_inputs,
        mask_inputs,
        output_dict,
        num_frames,
        track_in_reverse=False,
        run_mem_encoder=True,
        prev_sam_mask_logits=None,
    ):
        self.calls.append((frame_idx, is_init_cond_frame, track_in_reverse))
        self.points = None if point_inputs is None else point_inputs["point_labels"].tolist()
        cond, noncond = output_dict["cond_frame_outputs"], output_dict["non_cond_frame_outputs"]
        if not is_init_cond_frame:
            assert cond, "tracking needs a conditioning slice"
            step = -1 if track_in_reverse else 1
            for t in range(1, self.num_maskmem):
                out = noncond.get(frame_idx - step * t)
                if out is not None:
                    assert out["maskmem_features"] is not None, "a window memory is missing"
        held = sum(o["maskmem_features"] is not None for o in noncond.values())
        self.most_memories_held = max(self.most_memories_held, held)
        h, w = feat_sizes[-1]
        truth = current_vision_feats[-1][:, 0, 0].reshape(1, 1, h, w)
        logits = truth * 20.0 - 10.0
        if mask_inputs is not None:  # answered as given, and more confidently than a click
            given = torch.nn.functional.interpolate(mask_inputs, size=(h, w), mode="area")
            logits = given * 30.0 - 10.0
        score = torch.tensor([[5.0 if truth.any() else -5.0]])
        out = {
            "pred_masks": logits,
            "obj_ptr": torch.zeros(1, 4),
            "object_score_logits": score,
            "maskmem_features": None,
            "maskmem_pos_enc": None,
        }
        if run_mem_encoder:
            out["maskmem_features"], out["maskmem_pos_enc"] = self._encode_new_memory(
                None, None, None, score, point_inputs is not None
            )
        return out

    def computed(self) -> list[int]:
        """Slices tracked with memory (not the prompts' own answers)."""
        return [c[0] for c in self.calls if not c[1]]


def _encode(model, rgb):
    truth = torch.from_numpy(rgb[..., 0] > 127).float()[None, None]
    level = torch.nn.functional.interpolate(truth, size=(S // 4, S // 4), mode="nearest")
    return {"backbone_fpn": [level], "vision_pos_enc": [torch.zeros_like(level)]}


def _volume(first: int = 0, last: int = Z - 1) -> np.ndarray:
    vol = np.zeros((Z, H, W), dtype=np.uint8)
    vol[first : last + 1, 6:18, 4:12] = 200
    return vol


def _tracker(vol, model=None, max_memory_slices=4, **options):
    model = model or FakeSam2()
    cache = FeatureCache(model, vol, encode_fn=_encode, max_memory_slices=max_memory_slices)
    return VolumeTracker(model, cache, **options), model, cache


CLICK = dict(points=np.array([[8.0, 12.0]]), labels=np.array([1]))


def test_click_tracks_up_then_down_with_progress():
    tracker, model, _ = _tracker(_volume())
    answer = tracker.add_prompt(5, 1, **CLICK)
    assert answer.shape == (H, W) and (answer > 0).sum() > 0
    steps = list(tracker.track_iter())
    assert [s.slice for s in steps] == [5, 6, 7, 8, 9, 10, 11, 4, 3, 2, 1, 0]
    assert model.computed() == [6, 7, 8, 9, 10, 11, 4, 3, 2, 1, 0]
    assert [s.done for s in steps] == list(range(1, Z + 1))
    assert all(s.total == Z for s in steps)
    assert tracker.tracked_slices(1) == list(range(Z))
    # Nothing is left to do: a second run yields nothing and computes nothing.
    assert list(tracker.track_iter()) == []
    assert len(model.calls) == 1 + 11


def test_correction_retracks_only_downstream():
    tracker, model, _ = _tracker(_volume())
    tracker.add_prompt(5, 1, **CLICK)
    tracker.track()
    model.calls.clear()
    tracker.add_prompt(8, 1, **CLICK)  # slice 8 was reached walking up
    assert model.calls == [(8, False, False)]  # answered with memory, not as a new start
    steps = list(tracker.track_iter())
    assert [s.slice for s in steps] == [8, 9, 10, 11]
    assert model.computed()[1:] == [9, 10, 11]
    model.calls.clear()
    tracker.add_prompt(2, 1, **CLICK)  # reached walking down
    assert model.calls == [(2, False, True)]
    assert [s.slice for s in tracker.track_iter()] == [2, 1, 0]
    assert model.computed()[1:] == [1, 0]


def test_correction_without_conditioning_and_added_points():
    tracker, model, _ = _tracker(_volume(), corrections_as_conditioning=False)
    tracker.add_prompt(5, 1, **CLICK)
    tracker.add_prompt(5, 1, points=np.array([[2.0, 2.0]]), labels=np.array([0]), clear=False)
    assert model.points == [[1, 0]]  # the earlier click is kept
    tracker.add_prompt(5, 1, box=np.array([4, 6, 12, 18]))
    assert model.points == [[2, 3]]  # a box replaces the clicks: two corner points
    tracker.track()
    model.calls.clear()
    tracker.add_prompt(8, 1, **CLICK)
    steps = list(tracker.track_iter())
    assert [s.slice for s in steps] == [8, 9, 10, 11]
    assert model.computed() == [8, 9, 10, 11]  # the correction itself is not redone
    obj = tracker._objects[1]
    assert 8 in obj.noncond and 8 not in obj.cond  # remembered only as a recent slice


def test_correction_stops_at_the_next_prompted_slice():
    tracker, model, _ = _tracker(_volume())
    tracker.add_prompt(3, 1, **CLICK)
    tracker.add_prompt(9, 1, **CLICK)  # a second prompt before tracking: both anchor memory
    tracker.track()
    assert tracker.tracked_slices(1) == list(range(Z))
    model.calls.clear()
    tracker.add_prompt(5, 1, **CLICK)
    list(tracker.track_iter())
    assert model.computed()[1:] == [6, 7, 8]  # slice 9 is prompted; what follows is kept


def test_stop_after_empty_slices():
    tracker, _, _ = _tracker(_volume(first=3, last=8), stop_after=2)
    tracker.add_prompt(5, 1, **CLICK)
    steps = list(tracker.track_iter())
    assert [s.slice for s in steps] == [5, 6, 7, 8, 9, 10, 4, 3, 2, 1]
    assert tracker.tracked_slices(1) == list(range(1, 11))
    assert not steps[-1].masks.any()
    assert steps[-1].done == steps[-1].total == 10
    assert tracker.result(0).obj_ids == ()  # never reached
    # A walk that starts next to the object's end stops after stop_after slices as well.
    edge, _, _ = _tracker(_volume(first=3, last=8), stop_after=2)
    edge.add_prompt(3, 1, **CLICK)
    assert [s.slice for s in edge.track_iter()] == [3, 4, 5, 6, 7, 8, 9, 10, 2, 1]
    with pytest.raises(ValueError, match="stop_after"):
        _tracker(_volume(), stop_after=0)


def test_memory_bound_holds_only_the_window():
    tracker, model, cache = _tracker(_volume(), max_memory_slices=3)
    tracker.add_prompt(5, 1, **CLICK)
    seen = []
    for _ in tracker.track_iter():
        seen.append(len(cache._memory))
    assert max(seen) <= 3
    # The walk's window, plus the window the pending walk down will read first (slices just
    # above the prompt, kept so that they are not encoded twice).
    assert model.most_memories_held <= 2 * (model.num_maskmem - 1)
    assert model.memory_encodings == Z  # each slice encoded once (the prompt included)
    obj = tracker._objects[1]
    assert sum(o["maskmem_features"] is not None for o in obj.noncond.values()) == 0
    assert obj.cond[5]["maskmem_features"] is not None  # the prompted slice is remembered
    # A correction re-encodes the window it reads (3 slices below 9), no more.
    before = model.memory_encodings
    tracker.add_prompt(9, 1, **CLICK)
    assert model.memory_encodings - before == model.num_maskmem - 1
    keep, _, _ = _tracker(_volume(), keep_all_memories=True)
    keep.add_prompt(5, 1, **CLICK)
    keep.track()
    held = keep._objects[1].noncond.values()
    assert sum(o["maskmem_features"] is not None for o in held) == Z - 1


@pytest.mark.parametrize("how", ["event", "close"])
def test_cancel_resumes_without_redoing(how):
    tracker, model, _ = _tracker(_volume())
    tracker.add_prompt(5, 1, **CLICK)
    stop = threading.Event()
    walk = tracker.track_iter(cancel=stop)
    first = [next(walk).slice for _ in range(3)]
    if how == "event":
        stop.set()
        assert list(walk) == []
    else:
        walk.close()
    rest = [s.slice for s in tracker.track_iter()]
    assert first == [5, 6, 7]
    assert rest == [8, 9, 10, 11, 4, 3, 2, 1, 0]
    assert sorted(model.computed()) == sorted(set(model.computed()))  # none twice


def test_objects_labels_and_non_overlap():
    vol = _volume()
    tracker, model, _ = _tracker(vol, non_overlap=True)
    tracker.add_prompt(5, 1, **CLICK)
    half = np.zeros((H, W), dtype=bool)
    half[6:12, 4:12] = True
    tracker.add_prompt(5, 7, mask=half)
    steps = list(tracker.track_iter())
    assert [s.slice for s in steps] == [5, 6, 7, 8, 9, 10, 11, 4, 3, 2, 1, 0]
    assert all(s.obj_ids == (1, 7) for s in steps)
    assert all(s.updated == (1, 7) for s in steps[1:])
    # Features are computed once per slice for both objects.
    assert len([c for c in model.calls if not c[1]]) == 2 * (Z - 1)
    for s in steps:
        assert not (s.masks[0] & s.masks[1]).any()
    labels = steps[0].label_image()
    assert set(np.unique(labels)) <= {0, 1, 7}
    assert (labels[7:10, 5:11] == 7).all()  # inside the given mask (edges are resampled)
    assert (labels[14:17, 5:11] == 1).all()
    tracker.remove_object(7)
    assert tracker.object_ids == (1,)
    with pytest.raises(KeyError, match="no object 7"):
        tracker.remove_object(7)


def test_other_axis_and_track_volume_front_end():
    vol = np.transpose(_volume(), (1, 0, 2))  # slices along axis 1
    model = FakeSam2()
    cache = FeatureCache(model, vol, axis=1, encode_fn=_encode)
    prompts = [Prompt(slice=4, obj_id=3, points=np.array([[8.0, 12.0]]), labels=np.array([1]))]
    steps = list(track_volume(model, vol, prompts, features=cache))
    assert isinstance(steps[0], TrackStep) and steps[0].direction == 0
    assert [s.slice for s in steps[1:]] == [4, *range(5, Z), *range(3, -1, -1)]
    assert all(s.logits.shape == (1, H, W) for s in steps)
    truth = np.take(vol, 6, axis=1) > 0
    step6 = next(s for s in steps if s.slice == 6)
    assert (step6.masks[0] == truth).mean() > 0.9


def test_bad_prompts_say_what_to_do():
    tracker, _, _ = _tracker(_volume())
    with pytest.raises(IndexError, match="outside the volume"):
        tracker.add_prompt(Z, 1, **CLICK)
    with pytest.raises(ValueError, match="outside the image"):
        tracker.add_prompt(2, 1, points=np.array([[100.0, 1.0]]), labels=np.array([1]))
    with pytest.raises(ValueError, match="mask must have the slice's shape"):
        tracker.add_prompt(2, 1, mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="no prompt"):
        tracker.add_prompt(2, 1)
    with pytest.raises(ValueError, match="clear=True"):
        tracker.add_prompt(2, 1, box=np.array([1, 1, 8, 8]), clear=False)
    assert tracker.object_ids == ()  # nothing half-made stays behind
    with pytest.raises(ValueError, match="Nothing to track"):
        tracker.track()


def test_fill_hole_area_fills_small_holes_in_results():
    vol = _volume()
    vol[:, 12, 8] = 0  # one pixel that the fake's 8 x 8 masks see as a one-cell hole
    plain, _, _ = _tracker(vol)
    filled, _, _ = _tracker(vol, fill_hole_area=1)
    for tracker in (plain, filled):
        tracker.add_prompt(5, 1, **CLICK)
        tracker.track()
    for index in (2, 5, 9):
        assert not plain.result(index).masks[0][12, 8]
        assert filled.result(index).masks[0][12, 8]
        outside = np.ones((H, W), bool)
        outside[10:15, 6:11] = False
        same = plain.result(index).masks[0][outside] == filled.result(index).masks[0][outside]
        assert same.all()
    step = filled.result(5)
    assert list(step.masks_by_id()) == [1] and step.masks_by_id()[1].shape == (H, W)
