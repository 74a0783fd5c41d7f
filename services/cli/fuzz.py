"""``outrider fuzz``: random and adversarial requests against a running server, each
checked against the status the documented contract allows."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from .common import UsageError, add_server_options, server_client


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="fuzz a running server's gRPC API")
    add_server_options(parser)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="the same seed sends the same requests")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take (past it: a hang)")
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265",
                        help="the Ray dashboard, to count replica restarts (none: not counted)")
    parser.add_argument("--json", metavar="OUT", help="write requests, wrong_status, replica_restarts here")


def run(args) -> int:
    from ..reliability.fuzz import fuzz, serve_replicas

    if args.requests < 1:
        raise UsageError(f"--requests must be >= 1, got {args.requests}")
    client = server_client(args)
    dashboard = None if args.dashboard in ("", "none") else args.dashboard
    before = serve_replicas(dashboard) if dashboard else None
    with tqdm(total=args.requests, unit="req", desc="fuzz") as bar:
        report = fuzz(client, args.requests, args.seed, args.timeout, progress=bar.update)
    restarts = len(before - serve_replicas(dashboard)) if dashboard else None
    result = report.as_json(restarts)
    for wrong in result["wrong"]:
        print(f"wrong: {wrong['why']}\n  {wrong['request']}")
    print(f"{report.requests} requests in {report.seconds:.0f} s: {report.wrong_status} wrong statuses, "
          f"{'?' if restarts is None else restarts} replica restarts; {dict(report.by_code)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if report.wrong_status or restarts else 0
