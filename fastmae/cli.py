"""The ``fastmae`` command: ``fastmae bench`` and ``fastmae validate``.

``fastmae bench``     whole pretraining steps, stock against fastmae (:mod:`fastmae.bench`)
``fastmae validate``  every op of every available backend against :mod:`fastmae.reference`
                      (:mod:`fastmae.validate`)
``fastmae visualize`` a checkpoint's reconstruction of an image, the official demo's figure
                      (:mod:`fastmae.visualize`)
``fastmae pretrain``  MAE pretraining with the official recipe, torchrun-ready (:mod:`fastmae.pretrain`)

Also runnable as ``python -m fastmae ...``. Run ``fastmae <command> --help`` for the options.
"""

from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from . import bench, validate

    parser = argparse.ArgumentParser(
        prog="fastmae",
        description="fastmae: fused kernels for MAE pretraining. Benchmark and validate them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    pb = sub.add_parser("bench", help="throughput of whole pretraining steps, stock vs fastmae",
                        description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(pb)
    pb.set_defaults(func=bench.run)
    pv = sub.add_parser("validate", help="check every op of every available backend against the reference",
                        description=validate.__doc__.split("\n\n")[0])
    validate.add_arguments(pv)
    pv.set_defaults(func=validate.run)
    from . import visualize

    pz = sub.add_parser("visualize", help="the MAE demo's 4-panel reconstruction PNG of a checkpoint on an image",
                        description=visualize.__doc__.split("\n\n")[0])
    visualize.add_arguments(pz)
    pz.set_defaults(func=visualize.run)
    # `fastmae pretrain` parses its own arguments (main() hands them over): listed here for --help
    sub.add_parser("pretrain", add_help=False,
                   help="MAE pretraining, official main_pretrain.py flags, torchrun-ready; no arguments: a demo")
    return parser


def main(argv=None) -> int:
    """Entry point of the ``fastmae`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pretrain"]:  # its own parser: no arguments at all is the embedded demo
        from .pretrain import main as pretrain_main

        return pretrain_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args, command=shlex.join(["fastmae", *argv]))
