"""``outrider``: models, generate, bench, capacity, build-models, build-heads, serve, stop, fuzz, soak."""

from __future__ import annotations

import argparse
import sys

from . import bench, build, build_heads, capacity, fuzz, generate, models, serve, soak
from ..core.errors import InvalidRequest
from .common import UsageError, fail

COMMANDS = {"models": models, "generate": generate, "bench": bench, "capacity": capacity, "build-models": build,
            "build-heads": build_heads, "serve": serve,
            "stop": serve, "fuzz": fuzz, "soak": soak}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outrider", description="Distributed speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except (UsageError, InvalidRequest) as err:
        fail(str(err))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
