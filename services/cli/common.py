"""Options and error handling shared by the subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import torch


class UsageError(Exception):
    """Bad user input: reported on one line, exit code 2."""


def fail(message: str) -> NoReturn:
    print(f"outrider: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--target", help="target model: local folder or hub id (default: bundled)")
    group.add_argument("--draft", help="draft model: local folder or hub id (default: bundled)")
    group.add_argument("--medusa", help="Medusa heads for the target: folder or hub id "
                                        "(default: <target>-medusa beside the target, if there)")
    group.add_argument("--mtp", help="MTP modules for the target: folder or hub id (default: <target>-mtp beside "
                                     "the target, else the target's own checkpoint if it ships them)")
    group.add_argument("--eagle", help="an EAGLE-3 drafter for the target, in the published layout: folder or hub "
                                       "id (default: <target>-eagle beside the target, if there)")
    group.add_argument("--tree", help="Medusa's or MTP's token tree as paths of candidate ranks, e.g. '0;1;0.0', "
                                      "or 'auto': planned from measurement as it decodes (default: the tree tuned "
                                      "when the heads were built)")
    group.add_argument("--eagle-tree", help="EAGLE's dynamic tree as depth,top_k,nodes, e.g. 5,2,8 "
                                            "(default: the one saved with the drafter)")
    group.add_argument("--tree-drafters", help="the drafters the tree drafter merges, in order, of draft, suffix, "
                                               "ngram and one of medusa, mtp, eagle (default: draft,suffix)")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    group.add_argument("--dtype", default="default", choices=["default", "auto", "float32", "bfloat16", "float16"],
                       help="weights dtype (default: bf16 on GPU, fp32 on CPU)")
    group.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    group.add_argument("--trust-remote-code", action="store_true", help="allow model repos' own code")


def model_paths(args: argparse.Namespace):
    from ..models.loading import resolve_paths

    return resolve_paths(args.target, args.draft, args.medusa, args.mtp, getattr(args, "eagle", None))


def tree_option(args: argparse.Namespace, drafter: str) -> str | None:
    """The tree a drafter is asked for: --eagle-tree for EAGLE, --tree for Medusa and MTP,
    --tree-drafters for the tree drafter."""
    option = {"eagle": "eagle_tree", "tree": "tree_drafters"}.get(drafter, "tree")
    return getattr(args, option, None)


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads < 1:
        fail(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)


def validate_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"device {device!r} requested but CUDA is not available")


def add_server_options(parser: argparse.ArgumentParser, default: str | None = "127.0.0.1:9000", help: str = "") -> None:
    """--server and how to reach it: plain gRPC (a local cluster, inside Kubernetes) or
    TLS (through the TLS-terminating ingress)."""
    parser.add_argument("--server", metavar="HOST:PORT", default=default, help=help or "a running Outrider server")
    parser.add_argument("--tls", action="store_true", help="reach --server over TLS (e.g. the tls-ingress component)")
    parser.add_argument("--ca-cert", metavar="PEM", help="with --tls: the CA certificate to check the server against "
                                                         "(default: the system's roots)")


def server_client(args: argparse.Namespace, check: bool = True):
    """A client for ``--server``; with ``check``, one that answered a health check."""
    from ..gateway.client import OutriderClient

    if args.ca_cert and not args.tls:
        raise UsageError("--ca-cert needs --tls")
    ca = None
    if args.ca_cert:
        try:
            ca = open(args.ca_cert, "rb").read()
        except OSError as err:
            raise UsageError(f"--ca-cert: {err}") from None
    client = OutriderClient(args.server, tls=args.tls, ca_cert=ca)
    if check and not client.healthy(timeout=10):
        raise UsageError(f"no healthy Outrider server at {args.server}")
    return client
