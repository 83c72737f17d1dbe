"""Cohorts and remote encoding: the task functions serially, then on a LocalCluster of two worker
processes (same labels and embeddings as the serial run, a killed worker retried with nothing
half-written left, remote encoding with the same masks as local, fallback when the scheduler
is lost)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from napari_sam.cli import main
from napari_sam.cluster import tasks
from napari_sam.cluster.batch import chunk_slices, read_cohort, run_cohort, summary_table
from napari_sam.io.nifti import read_nifti
from napari_sam.prompts import mask_to_box
from napari_sam.training.synthetic import ellipsoid_volume, synthetic_scene
from napari_sam.volume.embeddings import EmbeddingCache
from napari_sam.weights import load_model
from testmodel import TEST_MODEL_PATH, load_test_model
from volume_helpers import dice, one_torch_thread  # noqa: F401 (autouse fixture)

MODEL = str(TEST_MODEL_PATH)
SOURCE = tasks.ModelSource(MODEL, device="cpu", precision=None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two small NIfTI volumes with one ellipsoid each, their truth and a box prompt file each."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "vols").mkdir()
    (root / "prompts").mkdir()
    truths = {}
    for k in range(2):
        volume, truth = ellipsoid_volume(np.random.default_rng(100 + k), (8, 64, 80), n_objects=1)
        path = root / "vols" / f"case{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), np.eye(4)), path)
        truth_path = root / f"truth{k}.nii.gz"
        nib.save(
            nib.Nifti1Image(np.transpose(truth, (2, 1, 0)).astype(np.uint8), np.eye(4)), truth_path
        )
        truth = read_nifti(truth_path).data
        truths[f"case{k}"] = truth
        z = int(np.argmax((truth == 1).sum(axis=(1, 2))))
        x0, y0, x1, y1 = (int(v) for v in mask_to_box(truth[z] == 1))
        box = [max(x0 - 2, 0), max(y0 - 2, 0), x1 + 2, y1 + 2]
        doc = {"objects": [{"label": 1, "prompts": [{"slice": z, "box": box}]}]}
        (root / "prompts" / f"case{k}.json").write_text(json.dumps(doc))
    (root / "images").mkdir()
    for k in range(2):
        image = synthetic_scene(np.random.default_rng(30 + k)).image
        Image.fromarray(image).save(root / "images" / f"scene{k}.png")
    return root, truths


def stored_embeddings(cache_dir: Path) -> dict[str, np.ndarray]:
    """Every slice file of every store under ``cache_dir``, by store and slice name."""
    out = {}
    for path in sorted(cache_dir.glob("*/slice_*.npz")):
        with np.load(path) as data:
            out[f"{path.parent.name}/{path.name}"] = data["embedding"]
    return out


def temporaries(*folders: Path) -> list[str]:
    return [p.name for f in folders for p in f.rglob(".*") if ".tmp" in p.name]


# -- serial: the task functions without dask ----------------------------------------------------


@pytest.fixture(scope="module")
def serial_run(cohort, tmp_path_factory):
    """The cohort embedded (two chunks per volume) and segmented serially by the command."""
    root = cohort[0]
    out = tmp_path_factory.mktemp("serial")
    common = ["--model", MODEL, "--device", "cpu", "--precision", "exact", "--quiet"]
    common += ["--cache-dir", str(out / "cache")]
    assert main(["batch", "embed", str(root / "vols"), "--chunk", "4", *common]) == 0
    segment = ["batch", "segment", str(root / "vols"), "--prompts", str(root / "prompts")]
    assert main([*segment, "-o", str(out / "labels"), *common]) == 0
    amg = ["batch", "amg", str(root / "images"), "-o", str(out / "masks"), *AMG]
    assert main([*amg, *common[:-2]]) == 0
    return out


AMG = ["--points-per-side", "6", "--pred-iou-thresh", "0.5", "--stability-score-thresh", "0.7"]


def test_serial_amg_writes_what_the_generator_finds(cohort, serial_run):
    from napari_sam.automatic import SamAutomaticMaskGenerator

    root = cohort[0]
    generator = SamAutomaticMaskGenerator(
        load_test_model(),
        points_per_side=6,
        pred_iou_thresh=0.5,
        stability_score_thresh=0.7,
        output_mode="coco_rle",
    )
    for k in range(2):
        written = json.loads((serial_run / "masks" / f"scene{k}.json").read_text())
        expected = generator.generate(np.asarray(Image.open(root / "images" / f"scene{k}.png")))
        assert len(written) >= 2
        assert written == json.loads(json.dumps(expected))


def test_serial_cohort_segments_every_volume_and_a_rerun_skips_it(cohort, serial_run, capsys):
    root, truths = cohort
    for name, truth in truths.items():
        labels = read_nifti(serial_run / "labels" / f"{name}.nii.gz").data
        # A sanity check of the pipeline (the cluster runs must equal this one exactly): the
        # tiny model on 8-slice volumes misses some of the thin end caps.
        assert dice(labels == 1, truth == 1) >= 0.8
    assert len(stored_embeddings(serial_run / "cache")) == 16  # 2 volumes x 8 slices
    capsys.readouterr()
    common = ["--model", MODEL, "--device", "cpu", "--precision", "exact"]
    common += ["--cache-dir", str(serial_run / "cache"), "--quiet"]
    assert main(["batch", "embed", str(root / "vols"), *common]) == 0
    table = capsys.readouterr().out
    assert "2 jobs: 0 done, 2 skipped, 0 failed" in table
    assert table.count("8 slices already stored") == 2
    segment = ["batch", "segment", str(root / "vols"), "--prompts", str(root / "prompts")]
    assert main([*segment, "-o", str(serial_run / "labels"), *common]) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out


def test_seeds_from_a_sparse_labels_file_are_propagated(cohort, serial_run, tmp_path):
    from napari_sam.io.nifti import write_labels

    root, truths = cohort
    vol = root / "vols" / "case1.nii.gz"
    truth = truths["case1"]
    z = int(np.argmax((truth == 1).sum(axis=(1, 2))))
    sparse = np.zeros_like(truth)
    sparse[z] = truth[z]  # one drawn slice
    (tmp_path / "seeds").mkdir()
    write_labels(tmp_path / "seeds" / "case1.nii.gz", sparse, read_nifti(vol).metadata)
    listing = tmp_path / "list.csv"
    listing.write_text(f"image,seeds\n{vol},seeds/case1.nii.gz\n")
    argv = ["batch", "segment", str(listing), "-o", str(tmp_path / "out"), "--model", MODEL]
    argv += ["--device", "cpu", "--precision", "exact", "--quiet"]
    assert main([*argv, "--cache-dir", str(serial_run / "cache")]) == 0
    labels = read_nifti(tmp_path / "out" / "case1.nii.gz").data
    np.testing.assert_array_equal(labels[z], sparse[z])  # the seed stays as drawn
    assert [i for i in range(len(labels)) if labels[i].any()] != [z]  # it was propagated
    assert dice(labels == 1, truth == 1) >= 0.8


def test_done_marker_follows_the_output_and_the_inputs(cohort, serial_run, tmp_path):
    root, _ = cohort
    vol = root / "vols" / "case0.nii.gz"
    output = tmp_path / "case0.nii.gz"
    job = tasks.SegmentJob(
        str(vol), str(output), SOURCE, prompts=str(root / "prompts" / "case0.json")
    )
    assert not tasks.is_done(job)
    # A killed earlier attempt left a half-written temporary file: the run removes it.
    leftover = tmp_path / ".case0.tmp-0badcafe.nii.gz"
    leftover.write_bytes(b"half")
    result = tasks.run_job(job, tasks.ModelLoader())
    assert result.status == "done" and not leftover.exists()
    assert tasks.is_done(job)
    assert temporaries(tmp_path) == []
    # Output damaged or replaced: not done any more.
    original = output.read_bytes()
    output.write_bytes(original[:-10])
    assert not tasks.is_done(job)
    output.write_bytes(original)
    assert tasks.is_done(job)
    # Other settings, other job: not done.
    other = tasks.SegmentJob(**{**job.__dict__, "min_pred_iou": 0.4})
    assert not tasks.is_done(other)


def test_bad_inputs_fail_with_a_reason_without_retries_and_the_exit_code_says_so(
    cohort, tmp_path, capsys
):
    root, _ = cohort
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "case0.json").write_text('{"objects": [{"label": 1, "prompts": []}]}')
    # case1 has no prompts file at all.
    argv = [
        "batch",
        "segment",
        str(root / "vols"),
        "--prompts",
        str(prompts),
        "-o",
        str(tmp_path / "out"),
        "--model",
        MODEL,
        "--device",
        "cpu",
        "--quiet",
        "--no-propagate",
    ]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 1
    table = capsys.readouterr().out
    assert "2 jobs: 0 done, 0 skipped, 2 failed" in table
    assert "'prompts' must be a non-empty list" in table
    assert "case1.json does not exist" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_serial_retries_a_job_that_raises_then_reports_it():
    class Flaky(tasks.ModelLoader):
        def __init__(self, failures):
            super().__init__()
            self.failures = failures

        def get(self, source):
            if self.failures > 0:
                self.failures -= 1
                raise MemoryError("out of memory")
            return super().get(source)

    job = tasks.EmbedJob("/nonexistent.nii.gz", "/tmp", SOURCE)
    # Reading the (missing) volume comes after the model: a bad input, not retried further.
    [result] = run_cohort([job], loader=Flaky(2), retries=2)
    assert (result.status, result.attempts) == ("failed", 3)
    assert "does not exist" in result.detail
    [result] = run_cohort([job], loader=Flaky(5), retries=2)
    assert (result.status, result.attempts, result.detail) == (
        "failed",
        3,
        "MemoryError: out of memory",
    )


def test_cohort_lists_chunks_csv_prompts_and_table(cohort, tmp_path):
    root, _ = cohort
    assert chunk_slices(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_slices(10, None) == [None] and chunk_slices(3, 8) == [None]
    assert tasks.display_shape(root / "vols" / "case0.nii.gz") == (8, 64, 80)
    listing = tmp_path / "list.csv"
    listing.write_text("image,prompts\n" + f"{root / 'vols' / 'case1.nii.gz'},p/case1.csv\n")
    assert read_cohort(listing) == [
        {"image": root / "vols" / "case1.nii.gz", "prompts": tmp_path / "p" / "case1.csv"}
    ]
    (tmp_path / "bad.csv").write_text("path\nx.nii.gz\n")
    with pytest.raises(tasks.JobError, match="'image' column"):
        read_cohort(tmp_path / "bad.csv")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(
        "label,slice,kind,x0,y0,x1,y1\n1,3,box,1,2,30,40\n1,3,negative,5,6,,\n2,4,point,7,8,,\n"
        "2,6,absent,,,,\n"
    )
    assert tasks.prompts_from_csv(prompts) == {
        "objects": [
            {"label": 1, "prompts": [{"slice": 3, "box": [1, 2, 30, 40], "negative": [[5, 6]]}]},
            {
                "label": 2,
                "prompts": [{"slice": 4, "points": [[7, 8]]}, {"slice": 6, "absent": True}],
            },
        ]
    }
    prompts.write_text("label,slice,kind,x0,y0,x1,y1\n1,3,circle,1,2,3,4\n")
    with pytest.raises(tasks.JobError, match="line 2"):
        tasks.prompts_from_csv(prompts)
    table = summary_table(
        [
            tasks.TaskResult("a.nii.gz", "done", "8 encoded", 1.25),
            tasks.TaskResult("b.nii.gz", "failed", "JobError: bad", 0.5),
        ]
    )
    lines = table.splitlines()
    assert lines[2].split() == ["a.nii.gz", "done", "1.2", "8", "encoded"]
    assert lines[-1] == "2 jobs: 1 done, 0 skipped, 1 failed"


def test_missing_distributed_gives_the_install_command(monkeypatch, cohort):
    import builtins

    real_import = builtins.__import__

    def no_distributed(name, *args, **kwargs):
        if name == "distributed" or name.startswith("distributed."):
            raise ImportError("No module named 'distributed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_distributed)
    from napari_sam.cluster import require_distributed

    with pytest.raises(ImportError, match=r"napari-sam-volumes\[cluster\]"):
        require_distributed()


# -- on a LocalCluster of two worker processes --------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as local,
        distributed.Client(local) as client,
    ):
        yield local, client


def _kill_in_the_middle_of_a_slice_write(marker: str):
    """Worker setup, once per cohort: the first slice write of any worker truncates its
    temporary file to half and ends the worker process, as a killed worker would."""
    import numpy

    real = numpy.savez

    def savez(file, *args, **kwargs):
        real(file, *args, **kwargs)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        file.flush()
        file.truncate(file.tell() // 2)
        file.flush()
        os._exit(1)

    numpy.savez = savez


@pytest.mark.slow  # two worker processes starting torch: about 20-40 s on a busy machine
def test_cluster_cohort_equals_serial_and_survives_a_killed_worker(
    cohort, serial_run, cluster, tmp_path
):
    local, client = cluster
    root, _ = cohort
    marker = tmp_path / "killed-once"
    client.run(_kill_in_the_middle_of_a_slice_write, str(marker))
    common = ["--model", MODEL, "--device", "cpu", "--precision", "exact", "--quiet"]
    common += ["--cache-dir", str(tmp_path / "cache"), "--scheduler", local.scheduler_address]
    assert main(["batch", "embed", str(root / "vols"), "--chunk", "4", *common]) == 0
    assert marker.exists()  # a worker did die mid-write
    assert temporaries(tmp_path / "cache") == []
    serial = stored_embeddings(serial_run / "cache")
    remote = stored_embeddings(tmp_path / "cache")
    assert sorted(serial) == sorted(remote)
    # Workers run their own torch thread pools, so float32 sums may round differently from the
    # serial run (seen: 6e-8 on an IoU score); the store keeps float16, so at most one float16
    # step (relative 2**-10) apart, and masks may differ only where a logit sits on the threshold.
    for key, value in serial.items():
        np.testing.assert_allclose(remote[key], value, rtol=2**-10, atol=1e-6, err_msg=key)
    segment = ["batch", "segment", str(root / "vols"), "--prompts", str(root / "prompts")]
    assert main([*segment, "-o", str(tmp_path / "labels"), *common]) == 0
    for k in range(2):
        got = read_nifti(tmp_path / "labels" / f"case{k}.nii.gz").data
        want = read_nifti(serial_run / "labels" / f"case{k}.nii.gz").data
        assert np.count_nonzero(got != want) <= want.size // 10_000, f"case{k}"
    assert temporaries(tmp_path / "labels") == []
    amg = ["batch", "amg", str(root / "images"), "-o", str(tmp_path / "masks"), *AMG]
    assert main([*amg, *common[:6], "--scheduler", local.scheduler_address, "--quiet"]) == 0
    for k in range(2):
        name = f"scene{k}.json"
        _assert_same_masks(
            json.loads((tmp_path / "masks" / name).read_text()),
            json.loads((serial_run / "masks" / name).read_text()),
        )


def _assert_same_masks(got: list[dict], want: list[dict]) -> None:
    """The same automatic masks, scores equal up to float32 rounding across processes."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for field, value in b.items():
            if field in ("predicted_iou", "stability_score"):
                assert a[field] == pytest.approx(value, rel=1e-5, abs=1e-6), field
            else:
                assert a[field] == value, field


@pytest.mark.slow  # shares the cluster above
def test_remote_encoding_gives_the_local_masks(cohort, cluster):
    from napari_sam.cluster.remote import remote_encoder
    from napari_sam.volume.session import VolumeSession

    local = cluster[0]
    root, truths = cohort
    volume = read_nifti(root / "vols" / "case1.nii.gz")
    truth = truths["case1"]
    z = int(np.argmax((truth == 1).sum(axis=(1, 2))))
    box = list(mask_to_box(truth[z] == 1))
    statuses = []
    encode = remote_encoder(local.scheduler_address, SOURCE, on_status=statuses.append)
    results = []
    try:
        for encode_fn in (None, encode):
            with VolumeSession(volume, load_test_model(), encode_fn=encode_fn) as session:
                session.segment_slice(z, box=box, label_id=1, multimask=False)
                session.propagate()
                embedding = session.cache.get(z)[0].clone()
                results.append((session.labels.copy(), embedding))
    finally:
        encode.close()
    (local_labels, local_emb), (remote_labels, remote_emb) = results
    assert encode.remote_slices == 8 and encode.local_slices == 0
    assert statuses == [f"remote: {local.scheduler_address}"]
    # Same code, weights and CPU on both sides: the same numbers up to float rounding order.
    np.testing.assert_allclose(remote_emb.numpy(), local_emb.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(remote_labels, local_labels)
    assert dice(remote_labels == 1, truth == 1) >= 0.8


@pytest.mark.slow  # an in-process cluster, a fast model, three encoders: 10-16 s when busy
def test_lost_or_missing_scheduler_falls_back_to_local_encoding():
    distributed = pytest.importorskip("distributed")
    from napari_sam.cluster.remote import remote_encoder

    model = load_test_model()
    volume = np.random.default_rng(0).integers(0, 255, (3, 40, 50)).astype(np.uint8)
    reference = EmbeddingCache(model, volume)
    statuses = []
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    )
    encode = remote_encoder(
        cluster.scheduler_address, SOURCE, timeout=10, on_status=statuses.append
    )
    cache = EmbeddingCache(model, volume, encode_fn=encode)
    try:
        first = cache.get(0)[0]
        assert encode.remote and statuses == [f"remote: {cluster.scheduler_address}"]
        # The workers' precision follows the local model: a fast fp32 model encodes remotely.
        from napari_sam.speed import with_precision

        fast = with_precision(model, "fp32")
        fast_encode = remote_encoder(cluster.scheduler_address, SOURCE, timeout=10)
        got = EmbeddingCache(fast, volume, encode_fn=fast_encode).get(0)[0]
        want = EmbeddingCache(fast, volume).get(0)[0]
        assert (fast_encode.remote_slices, fast_encode.local_slices) == (1, 0)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
        fast_encode.close()
        # Other weights locally than on the workers: refused, encoded locally.
        other = load_model(TEST_MODEL_PATH, device="cpu")
        with torch.no_grad():
            next(other.parameters()).add_(1e-3)
        wrong = remote_encoder(cluster.scheduler_address, SOURCE, timeout=10)
        with pytest.warns(RuntimeWarning, match="differs from the local one"):
            EmbeddingCache(other, volume, encode_fn=wrong).get(0)
        assert (wrong.remote_slices, wrong.local_slices) == (0, 1)
        wrong.close()
    finally:
        cluster.close()
    with pytest.warns(RuntimeWarning, match="encoding locally"):
        second = cache.get(1)[0]
    assert not encode.remote and encode.status.startswith("local: ")
    assert statuses[-1] == encode.status
    assert (encode.remote_slices, encode.local_slices) == (1, 1)
    for index, got in ((0, first), (1, second)):
        np.testing.assert_allclose(got.numpy(), reference.get(index)[0].numpy(), atol=1e-5)
    # A scheduler that is not there at all: the first slice is already local.
    nowhere = remote_encoder("tcp://127.0.0.1:9", SOURCE, timeout=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EmbeddingCache(model, volume, encode_fn=nowhere).get(2)
    assert any("encoding locally" in str(w.message) for w in caught)
    assert (nowhere.remote_slices, nowhere.local_slices) == (0, 1)
