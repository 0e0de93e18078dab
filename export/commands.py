"""export's subcommands: `export` (ONNX + verification + manifest) and `build-plans` (TensorRT)."""

from __future__ import annotations

import argparse
from pathlib import Path

from export.common import DEFAULT_OPSET, ExportOptions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the model to ONNX (verified against engine_ref) with a manifest")
    p.add_argument("--model", required=True, help="model directory or Hugging Face repo id (local cache only)")
    p.add_argument("--out", required=True, help="output directory for graphs + manifest.json")
    p.add_argument("--components", nargs="+", default=None,
                   help="default: all of the model's family. IndexTTS 1.x: cond_encoder gpt vocoder; IndexTTS-2: "
                        "semantic_encoder semantic_codec campplus conditioners gpt s2mel_front cfm vocoder; "
                        "IndexTTS-2.5: semantic_encoder campplus speaker_projection emotion_conditioner gpt "
                        "codec_decoder s2mel_front cfm vocoder")
    p.add_argument("--precision", nargs="+", default=["fp32"],
                   help="fp32 always; add fp16 (GPU) and/or int8/int4 (weight-only decoder for CPU)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the graphs are verified and profiled for")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--no-verify", action="store_true", help="skip parity checks (not recommended)")
    p.add_argument("--force", action="store_true", help="re-export even when the output is up to date")
    p.set_defaults(func=cmd_export)
    try:
        from export import tensorrt
    except ImportError:  # pragma: no cover - the module ships with the package
        return
    tensorrt.register(sub)


def cmd_export(args: argparse.Namespace) -> int:
    from export.pipeline import ExportRequest, run_export

    precisions = tuple(dict.fromkeys(["fp32", *args.precision]))
    req = ExportRequest(
        model=args.model, out_dir=Path(args.out), components=tuple(args.components or ()),
        precisions=precisions,
        options=ExportOptions(opset=args.opset, max_batch=args.max_batch, verify=not args.no_verify),
        force=args.force,
    )
    manifest, exported = run_export(req)
    if not exported:
        print(f"{args.out} is up to date (manifest.json matches the model files and options); nothing exported")
        return 0
    for name, comp in manifest.components.items():
        parity = f"max_rel {comp.parity.max_rel:.2e}" if comp.parity else "not verified"
        print(f"{name:24s} {comp.precision:5s} {comp.file:32s} {parity}")
    print(f"wrote {Path(args.out) / 'manifest.json'}")
    return 0
