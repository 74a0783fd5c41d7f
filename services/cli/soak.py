"""``outrider soak``: many streams for minutes against a running server, optionally
with faults injected on a schedule; every stream checked against an undisturbed run."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from .bench import DEFAULT_PROMPTS, load_prompts
from .common import UsageError, add_server_options, server_client

METHODS = ("draft", "ngram", "medusa", "mtp", "eagle", "none")


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="soak a running server with many streams, optionally under chaos")
    add_server_options(parser)
    parser.add_argument("--streams", type=int, default=64, help="client streams at once")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--methods", default="draft,ngram,medusa,none",
                        help=f"comma-separated speculation methods to mix, of {', '.join(METHODS)}")
    parser.add_argument("--chaos", action="store_true",
                        help="kill replicas and the session store, freeze nodes, drop draft streams, in rotation")
    parser.add_argument("--chaos-every", type=float, default=30.0, metavar="S", help="seconds between faults")
    parser.add_argument("--freeze", type=float, default=10.0, metavar="S", help="seconds a frozen node stays stopped")
    parser.add_argument("--deadline", type=float, default=600.0, metavar="S",
                        help="each stream's deadline; a stream still unanswered then is counted as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-address", default="127.0.0.1:6390",
                        help="the server's Ray cluster, for chaos, memory and leftover sessions ('none': skip them)")
    parser.add_argument("--json", metavar="OUT", help="write streams, lost, corrupted, hung, memory_growth_ratio here")


def run(args) -> int:
    from ..reliability.soak import make_cases, soak

    if args.streams < 1 or args.minutes <= 0 or args.chaos_every <= 0 or args.deadline <= 1:
        raise UsageError("--streams must be >= 1, and --minutes, --chaos-every and --deadline positive")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise UsageError(f"--methods: choose from {', '.join(METHODS)}")
    ray_address = None if args.ray_address in ("", "none") else args.ray_address
    if args.chaos and ray_address is None:
        raise UsageError("--chaos needs the server's --ray-address")
    client = server_client(args)
    cases = make_cases(load_prompts(DEFAULT_PROMPTS, 8), methods)
    with tqdm(unit="stream", desc="soak") as bar:
        report = soak(client, cases, args.streams, args.minutes * 60, ray_address,
                      chaos_every_s=args.chaos_every if args.chaos else 0.0, freeze_s=args.freeze,
                      deadline_s=args.deadline, seed=args.seed, on_outcome=lambda _: bar.update())
    result = report.as_json()
    for failure in result["failures"]:
        print(f"{failure['verdict']}: {failure['kind']} stream, {failure['code']}: {failure['why']}")
    for event in result["chaos"]:
        print(f"chaos at {event['t']} s: {event['event']} {event['target']}{' FAILED ' + event['error'] if event['error'] else ''}")
    print(f"{result['streams']} streams in {result['seconds']:.0f} s: {result['lost']} lost, {result['corrupted']} "
          f"corrupted, {result['hung']} hung; {result['verdicts']}; {result['capacity_retries']} sent again after a "
          f"refusal at capacity; memory growth {result['memory_growth_ratio']}; "
          f"left over {result['leftover']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    leaked = any(result["leftover"].values()) if result["leftover"] else False
    return 1 if result["lost"] or result["corrupted"] or result["hung"] or leaked else 0
