"""Bench results: a table on stdout, a JSON file and a speedup-vs-gamma plot."""

from __future__ import annotations

import json
from pathlib import Path

from .runs import Run, leviathan_speedup


def _target_only(runs: list[Run]) -> tuple[Run, float]:
    """The baseline run and its seconds per token."""
    ar = next(r for r in runs if r.method.startswith("target-only"))  # the first, in concurrency scenarios
    return ar, ar.seconds / ar.tokens


def best_by_drafter(runs: list[Run], ar: Run) -> dict:
    """{drafter: its fastest config's speedup, mean accepted length, gamma or tree, and
    (served) its overlap and the bytes a round moved each way: drafts to the verifier,
    features (EAGLE on the draft workers) to the worker}."""
    best: dict[str, Run] = {}
    for r in runs:
        if r.drafter not in best or r.tokens_per_s > best[r.drafter].tokens_per_s:
            best[r.drafter] = r

    def entry(r: Run) -> dict:
        s, rounds = r.stats, max(1, r.stats.rounds)
        return {"speedup_vs_ar": r.tokens_per_s / ar.tokens_per_s, "mean_accepted_length": s.mean_acceptance_length,
                "gamma_or_tree": r.gamma_or_tree, "config": r.label, "overlap": s.overlap,
                "draft_bytes_per_round": s.draft_bytes / rounds, "feature_bytes_per_round": s.feature_bytes / rounds}

    return {name: entry(r) for name, r in best.items()}


def tree_summary(runs: list[Run]) -> dict:
    """The tree drafter's mean accepted length over the best single drafter's at the
    same gamma (pipelined and serial runs alike), per gamma; empty without tree runs."""
    ratios = {}
    for t in (r for r in runs if r.drafter == "tree"):
        singles = [r.stats.mean_acceptance_length for r in runs
                   if r.drafter not in ("tree", "none") and r.gamma == t.gamma and r.method == t.method.replace("tree", r.drafter)]
        if singles and max(singles) > 0:
            ratios[t.label] = t.stats.mean_acceptance_length / max(singles)
    return {"tree_mal_vs_best_single": ratios} if ratios else {}


def summarize(runs: list[Run]) -> dict:
    ar, ar_spt = _target_only(runs)
    outrider = [r for r in runs if r.method.startswith("outrider-")]
    hf = [r for r in runs if r.method == "hf-assisted"]
    best = max(outrider, key=lambda r: r.tokens_per_s)
    best_hf = max(hf, key=lambda r: r.tokens_per_s) if hf else None
    theoretical = leviathan_speedup(best, ar_spt)
    speedup = best.tokens_per_s / ar.tokens_per_s
    return {
        "best_config": best.label,
        "ar_tokens_per_s": ar.tokens_per_s,
        "sd_tokens_per_s": best.tokens_per_s,
        "hf_assisted_tokens_per_s": best_hf.tokens_per_s if best_hf else None,
        "hf_assisted_best_config": best_hf.label if best_hf else None,
        "speedup_vs_ar": speedup,
        "speedup_vs_hf": best.tokens_per_s / best_hf.tokens_per_s if best_hf else None,
        "acceptance_rate": best.stats.acceptance_rate,
        "per_token_acceptance": best.stats.per_token_acceptance,
        "mean_accepted_length": best.stats.mean_acceptance_length,
        "theoretical_speedup": theoretical,
        "measured_over_theoretical": speedup / theoretical,
        "best_by_drafter": best_by_drafter(outrider, ar),
        **tree_summary(outrider),
        **({"tree_plans": {r.label: r.plan for r in outrider if r.plan}} if any(r.plan for r in outrider) else {}),
        # Greedy decoding: every method must produce exactly the target-only tokens.
        "outputs_identical": all(r.outputs == ar.outputs for r in runs),
        **pipeline_summary(runs),
    }


def pipeline_summary(runs: list[Run]) -> dict:
    """Served runs only: the best pipelined config's hit rates, overlap and per-round
    time breakdown, and what pipelining gained over drafting serially. pipeline_hit_rate:
    rounds whose next block the verifier already held; cache_hit_rate: rounds whose
    outcome the worker had drafted the next block for (held, or sent at once)."""
    piped = [r for r in runs if r.stats.pipeline_rounds]
    if not piped:
        return {}
    best = max(piped, key=lambda r: r.tokens_per_s)
    s = best.stats
    out = {
        "pipelined_best_config": best.label,
        "pipeline_hit_rate": s.pipeline_hit_rate,
        "cache_hit_rate": s.cache_hit_rate,
        "cache_hits_partial_share": s.cache_hits_partial / s.cache_hits if s.cache_hits else 0.0,
        "branches_per_round": s.branches_drafted / s.pipeline_rounds,
        "overlap": s.overlap,
        "round_breakdown_ms": round_breakdown_ms(best),
    }
    serial = [r for r in runs if r.method == best.method + "-serial" and r.gamma == best.gamma]
    one_guess = [r for r in runs if r.method == best.method and r.gamma == best.gamma and r.fanout == 1]
    if one_guess and best.fanout != 1:
        out["cache_speedup_vs_one_guess"] = best.tokens_per_s / one_guess[0].tokens_per_s
    if serial:
        out["pipelining_speedup"] = best.tokens_per_s / serial[0].tokens_per_s
    return out


def round_breakdown_ms(run: Run) -> dict:
    """Mean wall time of one round as the client saw it, split by where it went."""
    s = run.stats
    per = 1000 / s.rounds
    hidden = s.draft_time_s - s.exposed_draft_time_s
    accounted = s.verify_time_s + s.exposed_draft_time_s + s.transport_time_s + s.queue_time_s
    return {
        "total": run.seconds * per,
        "verify": s.verify_time_s * per,
        "draft_exposed": s.exposed_draft_time_s * per,
        "draft_hidden": hidden * per,
        "transport": s.transport_time_s * per,
        "queue": s.queue_time_s * per,
        "other": (run.seconds - accounted) * per,  # gateway, proxy, streaming to the client
    }


def run_rows(runs: list[Run]) -> list[dict]:
    ar, ar_spt = _target_only(runs)
    rows = []
    for r in runs:
        # Outputs compare with target-only at the same concurrency (a level runs its own prompts).
        same = next((b for b in runs if b.concurrency == r.concurrency and b.method.startswith("target-only")), ar)
        row = {}
        if r.method.startswith("outrider-") and r.stats.rounds:
            row.update(r.stats.to_dict())
            row["theoretical_speedup"] = leviathan_speedup(r, ar_spt)
        # The run's own wall-clock figures win over the stats' (which, served, leave out
        # the client's side of the hops).
        row.update({"config": r.label, "method": r.method, "gamma": r.gamma, "tokens": r.tokens,
                    "seconds": r.seconds, "tokens_per_s": r.tokens_per_s,
                    "speedup_vs_ar": r.tokens_per_s / ar.tokens_per_s, "identical_to_target_only": r.outputs == same.outputs})
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'config':<34}{'tok/s':>9}{'vs AR':>8}{'accept':>8}{'mean len':>10}{'theory':>8}{'same':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{r['acceptance_rate']:.2f}" if "acceptance_rate" in r else "-"
        mal = f"{r['mean_acceptance_length']:.2f}" if "mean_acceptance_length" in r else "-"
        theo = f"{r['theoretical_speedup']:.2f}" if "theoretical_speedup" in r else "-"
        lines.append(f"{r['config']:<34}{r['tokens_per_s']:>9.1f}{r['speedup_vs_ar']:>7.2f}x{acc:>8}{mal:>10}"
                     f"{theo:>8}{'yes' if r['identical_to_target_only'] else 'NO':>6}")
    return "\n".join(lines)


def write_json(path: Path, summary: dict, rows: list[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**summary, "runs": rows, "meta": meta}, indent=2) + "\n")


def _plot(path: Path, title: str, xlabel: str, ylabel: str, draw) -> None:
    """A 6x4 PNG at ``path``: ``draw(ax)`` plots the lines, then a target-only line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="target-only")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plot(path: Path, rows: list[dict]) -> None:
    def draw(ax):
        for method in sorted({r["method"] for r in rows if r["gamma"]}):
            points = sorted((r["gamma"], r["speedup_vs_ar"]) for r in rows if r["method"] == method and r["gamma"])
            ax.plot([g for g, _ in points], [s for _, s in points], marker="o", label=method)

    _plot(path, "Speedup against gamma (greedy, batch 1)", "gamma (tokens drafted per round)",
          "speedup over target-only (tokens/s)", draw)


def write_concurrency_plot(path: Path, by_concurrency: dict, sampling: str = "greedy") -> None:
    """Speculative over target-only tokens/s against concurrent streams."""
    levels = sorted(by_concurrency, key=int)

    def draw(ax):
        ax.plot([int(n) for n in levels], [by_concurrency[n]["speculative_vs_target_only"] for n in levels],
                marker="o", label=by_concurrency[levels[0]]["config"].split(" x")[0] if levels else "speculative")
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(n) for n in levels], labels=levels)

    _plot(path, f"Speculative decoding under load ({sampling}, same service)", "concurrent streams",
          "speculative / target-only (tokens/s)", draw)
