"""The options commands share (commands/_options.py): the same flags, defaults and parsing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from napari_sam.cli import CommandError, build_parser
from napari_sam.commands._options import parse_slices, window_from_args
from napari_sam.intensity import Window

# Each command with the least it needs to parse.
COMMANDS = {
    "segment": ["segment", "v.nii.gz", "-o", "o.nii.gz"],
    "embed": ["embed", "v.nii.gz"],
    "amg": ["amg", "x.png", "-o", "out"],
    "export-onnx": ["export-onnx", "-o", "d.onnx"],
    "train": ["train", "data", "-o", "o.pth"],
    "batch embed": ["batch", "embed", "cohort"],
    "batch segment": ["batch", "segment", "cohort", "-o", "labels"],
    "batch amg": ["batch", "amg", "images", "-o", "masks"],
}
VOLUME_COMMANDS = ("segment", "embed", "amg")


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def _actions(parser: argparse.ArgumentParser, command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {opt: a for a in sub.choices[command]._actions for opt in a.option_strings}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_model_command_takes_model_type_and_checkpoint(parser, command):
    args = parser.parse_args([*COMMANDS[command], "--model-type", "vit_t", "--checkpoint", "w.pt"])
    assert args.model == "vit_t" and args.checkpoint == Path("w.pt")
    assert parser.parse_args([*COMMANDS[command], "--model", "vit_l"]).model == "vit_l"


def test_model_defaults(parser):
    for command in ("segment", "embed", "amg", "export-onnx", "batch embed", "batch amg"):
        assert parser.parse_args(COMMANDS[command]).model == "vit_b", command
    # train needs --model or --config, and never both.
    with pytest.raises(SystemExit):
        parser.parse_args(COMMANDS["train"])
    with pytest.raises(SystemExit):
        parser.parse_args([*COMMANDS["train"], "--model-type", "vit_t", "--config", "c.json"])


@pytest.mark.parametrize("option", ["--device", "--precision", "--window", "--axis"])
def test_shared_options_are_declared_once(parser, option):
    actions = [_actions(parser, command)[option] for command in VOLUME_COMMANDS]
    assert len({(a.dest, a.type, a.choices and tuple(a.choices)) for a in actions}) == 1
    defaults = {a.default for a in actions}
    # amg leaves --window unset so that 8-bit photos keep their values; volumes use "auto".
    assert defaults == ({"auto", None} if option == "--window" else {actions[0].default})
    assert _actions(parser, "train")["--device"].default == "cpu"


def test_session_commands_share_the_embedding_store_options(parser):
    for command in ("segment", "embed"):
        actions = _actions(parser, command)
        assert actions["--cache-dir"].type is Path and "--no-cache" in actions


def _window(text: str | None):
    return window_from_args(argparse.Namespace(window=text))


def test_window_from_args():
    assert _window("0,50") == Window(0.0, 50.0)
    assert _window(" -160.5, 240 ") == Window(-160.5, 240.0)
    assert _window("soft_tissue") == "soft_tissue" and _window("auto") == "auto"
    assert _window(None) is None
    for text, message in [
        ("5,1", "HIGH must be greater than LOW"),
        ("1,2,3", "expected LOW,HIGH"),
        ("a,b", "expected LOW,HIGH"),
        ("weird", "unknown window mode 'weird'"),
    ]:
        with pytest.raises(CommandError, match=f"--window: .*{message}"):
            _window(text)


def test_slice_ranges_are_half_open():
    assert parse_slices("4:9", 20) == (4, 9)  # slices 4..8, as range(4, 9)
    assert parse_slices("4", 20) == (4, 5)
    assert parse_slices(":3", 20) == (0, 3)
    assert parse_slices("7:", 20) == (7, 20)
    assert parse_slices("0:20", 20) == (0, 20)
    assert parse_slices(None, 20) is None
    for text in ("9:4", "4:4", "0:21", "20", "a:b", "1:2:3"):
        with pytest.raises(CommandError, match="--slices"):
            parse_slices(text, 20)
