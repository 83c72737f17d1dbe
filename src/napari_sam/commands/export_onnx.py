"""``napari-sam export-onnx``: the prompt encoder + mask decoder as an ONNX file.

The file has the inputs and outputs of segment_anything's ``scripts/export_onnx_model.py``
(see :mod:`napari_sam.onnx_export`), so web and onnxruntime clients written for it work::

    napari-sam export-onnx --model vit_b --checkpoint sam_vit_b_01ec64.pth -o decoder.onnx \\
        --return-single-mask --quantize-out decoder_int8.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_sam.commands._options import add_model_options, load_model_or_fail

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export-onnx",
        help="export the prompt encoder + mask decoder to ONNX (as segment_anything's script)",
        description=(
            "Export SAM's prompt encoder, mask decoder and mask upscaling to ONNX, with the "
            "inputs and outputs of segment_anything's export script. The image encoder is not "
            "exported: compute embeddings with napari-sam embed or SamPredictor."
        ),
    )
    add_model_options(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    p.add_argument(
        "--return-single-mask",
        action="store_true",
        help="return only the best mask (faster upscaling for large images)",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 11 (default: 17)")
    p.add_argument(
        "--quantize-out",
        type=Path,
        help="also write a dynamically int8-quantised copy to this file (onnxruntime)",
    )
    p.add_argument(
        "--gelu-approximate",
        action="store_true",
        help="tanh approximation of GELU, for runtimes with a slow or missing Erf",
    )
    p.add_argument(
        "--use-stability-score",
        action="store_true",
        help="report the stability score of the low-res masks instead of the predicted IoU",
    )
    p.add_argument(
        "--return-extra-metrics",
        action="store_true",
        help="also return stability scores and areas of the upscaled masks",
    )
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_sam.cli import CommandError

    outputs = [args.output] + ([args.quantize_out] if args.quantize_out else [])
    for path in outputs:
        if path.exists() and not args.force:
            raise CommandError(f"output {path} exists; pass --force to replace it")
        if not path.parent.is_dir():
            raise CommandError(f"output folder {path.parent} does not exist")
    if args.quantize_out is not None and args.quantize_out.resolve() == args.output.resolve():
        raise CommandError("--quantize-out must name a different file than --output")
    if args.opset < 11:
        raise CommandError(f"--opset must be >= 11, got {args.opset}")
    try:
        from napari_sam.onnx_export import export_decoder, quantize_decoder
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    model = load_model_or_fail(args, "cpu")

    print(f"exporting the decoder of {model.spec.name} to {args.output} ...")
    try:
        export_decoder(
            model,
            args.output,
            return_single_mask=args.return_single_mask,
            opset=args.opset,
            gelu_approximate=args.gelu_approximate,
            use_stability_score=args.use_stability_score,
            return_extra_metrics=args.return_extra_metrics,
        )
        if args.quantize_out is not None:
            print(f"quantising to {args.quantize_out} ...")
            quantize_decoder(args.output, args.quantize_out)
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    print("done")
    return 0
