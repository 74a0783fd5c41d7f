"""Render the Grafana dashboard JSON's panels from a live Prometheus, without Grafana.

Reads ``outrider-spec-decode.json``, fills in its template variables the way Grafana
would with "All" selected, runs every panel target's ``expr`` through Prometheus's
``/api/v1/query_range``, draws each panel as an inline SVG time series in the
dashboard's grid layout (``gridPos``; stacking, unit, min/max and legend calcs from
the panel) and screenshots the HTML page with headless Chromium:

    python cluster/grafana/render_panels.py --prometheus http://127.0.0.1:9090 \
        --minutes 15 --out cluster/grafana/outrider-spec-decode.png

Standard library only. It is a check of the dashboard's queries against a real scrape,
not a replacement for Grafana (no tooltips, no variable pickers).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d",
          "#fade2a", "#447ebc", "#c15c17"]
COL_W, ROW_H, GAP = 1600 / 24, 30, 8  # Grafana's grid: 24 columns, 30 px rows


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variable syntaxes: $name, ${name}, [[name]]; longest names first."""
    for name in sorted(variables, key=len, reverse=True):
        value = variables[name]
        expr = expr.replace("${%s}" % name, value).replace("[[%s]]" % name, value)
        expr = re.sub(r"\$%s\b" % re.escape(name), lambda _: value, expr)
    return expr


def dashboard_variables(dashboard: dict, rate_interval: str, step: int, minutes: int) -> dict[str, str]:
    """Every query variable at "All" (its allValue, else a match-all regex), plus the
    built-ins a panel query may use."""
    variables = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            variables[var["name"]] = var.get("allValue") or ".*"
    variables.update({"__rate_interval": rate_interval, "__interval": f"{step}s", "__interval_ms": str(step * 1000),
                      "__range": f"{minutes * 60}s", "__range_s": str(minutes * 60)})
    return variables


def query_range(prometheus: str, expr: str, start: float, end: float, step: int) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus.rstrip('/')}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict) -> str:
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items() if k != "__name__") + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def fmt_value(v: float, unit: str) -> str:
    if v is None or math.isnan(v):
        return "-"
    if unit == "percentunit":
        return f"{v * 100:.1f}%"
    if unit == "s":
        return f"{v * 1000:.3g} ms" if abs(v) < 1 else f"{v:.3g} s"
    if unit == "bytes":
        for suffix, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(v) >= scale:
                return f"{v / scale:.3g} {suffix}"
        return f"{v:.0f} B"
    suffix = " req/s" if unit == "reqps" else ""
    if abs(v) >= 1000:
        return f"{v / 1000:.3g}K{suffix}"
    return f"{v:.3g}{suffix}"


def nice_step(span: float, unit: str) -> float:
    """A round tick step giving about four ticks over ``span`` (powers of 2 for bytes)."""
    raw = max(span, 1e-12) / 4
    if unit == "bytes":
        return 2 ** math.ceil(math.log2(raw))
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def panel_svg(panel: dict, series: list[tuple[str, dict[float, float]]], w: float, h: float,
              start: float, end: float) -> str:
    """One time-series panel: plot area left, legend table (lastNotNull, mean) right."""
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    custom, unit = defaults.get("custom", {}), defaults.get("unit", "short")
    stacked = custom.get("stacking", {}).get("mode", "none") != "none"
    fill = custom.get("fillOpacity", 10) / 100
    legend_w = w * 0.40
    px0, py0, px1, py1 = 62, 34, w - legend_w - 10, h - 26
    out = [f'<text x="10" y="21" class="title">{html.escape(panel.get("title", ""))}</text>']
    if not series:
        out.append(f'<text x="{w / 2}" y="{h / 2}" class="nodata">No data</text>')
        return "".join(out)
    stamps = sorted({t for _, pts in series for t in pts})
    base = {t: 0.0 for t in stamps}
    drawn = []  # (name, [(t, lo, hi)])
    for name, pts in series:
        line = []
        for t in stamps:
            v = pts.get(t)
            if v is None and not stacked:
                continue
            lo = base[t] if stacked else 0.0
            hi = lo + (v or 0.0)
            if stacked:
                base[t] = hi
            line.append((t, lo, hi))
        drawn.append((name, line))
    top = max((hi for _, line in drawn for _, _, hi in line), default=1.0)
    ymin = defaults.get("min", 0)
    ystep = nice_step((defaults.get("max", top) - ymin) or 1, unit)
    ymax = defaults.get("max", ymin + ystep * max(1, math.ceil((top - ymin) / ystep)))
    x = lambda t: px0 + (t - start) / (end - start) * (px1 - px0)
    y = lambda v: py1 - (min(max(v, ymin), ymax) - ymin) / ((ymax - ymin) or 1) * (py1 - py0)
    for i in range(round((ymax - ymin) / ystep) + 1):  # y grid
        v = ymin + ystep * i
        out.append(f'<line x1="{px0}" x2="{px1}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
                   f'<text x="{px0 - 6}" y="{y(v) + 4:.1f}" class="ytick">{fmt_value(v, unit)}</text>')
    tick = 60 * max(1, round((end - start) / 60 / 6))
    for t in range(int(start // tick + 1) * tick, int(end), tick):  # x grid, local time
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{py0}" y2="{py1}" class="grid"/>'
                   f'<text x="{x(t):.1f}" y="{py1 + 16}" class="xtick">{time.strftime("%H:%M", time.localtime(t))}'
                   f'</text>')
    for i, (name, line) in enumerate(drawn):
        color = COLORS[i % len(COLORS)]
        if not line:
            continue
        top_pts = " ".join(f"{x(t):.1f},{y(hi):.1f}" for t, _, hi in line)
        if fill > 0:
            bottom = " ".join(f"{x(t):.1f},{y(lo):.1f}" for t, lo, _ in reversed(line))
            out.append(f'<polygon points="{top_pts} {bottom}" fill="{color}" fill-opacity="{fill}" stroke="none"/>')
        out.append(f'<polyline points="{top_pts}" fill="none" stroke="{color}" '
                   f'stroke-width="{custom.get("lineWidth", 1) + 0.5}"/>')
    lx = w - legend_w
    out.append(f'<text x="{lx + legend_w - 92}" y="{py0}" class="lhead">Last *</text>'
               f'<text x="{lx + legend_w - 10}" y="{py0}" class="lhead">Mean</text>')
    room = int((legend_w - 182) / 6.6)  # characters of a name that fit before the value columns
    for i, (name, pts) in enumerate(series[:12]):
        name = name if len(name) <= room else name[:room - 1] + "\u2026"
        values = [v for v in pts.values() if v is not None]
        last = next((pts[t] for t in sorted(pts, reverse=True) if pts[t] is not None), None)
        mean = sum(values) / len(values) if values else None
        ly = py0 + 18 * (i + 1)
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="12" height="4" fill="{COLORS[i % len(COLORS)]}"/>'
                   f'<text x="{lx + 17}" y="{ly}" class="lname">{html.escape(name)}</text>'
                   f'<text x="{lx + legend_w - 92}" y="{ly}" class="lval">{fmt_value(last, unit)}</text>'
                   f'<text x="{lx + legend_w - 10}" y="{ly}" class="lval">{fmt_value(mean, unit)}</text>')
    return "".join(out)


CSS = """body{margin:0;background:#111217;font-family:Inter,Helvetica,Arial,sans-serif}
h1{color:#ccccdc;font-size:18px;font-weight:500;margin:0;padding:12px 8px 4px}
.sub{color:#8e8e9e;font-size:12px;padding:0 8px 6px}
.grid-root{position:relative}
svg{position:absolute;background:#181b1f;border:1px solid #2c3235;border-radius:3px}
.title{fill:#ccccdc;font-size:14px;font-weight:500}.nodata{fill:#8e8e9e;font-size:16px;text-anchor:middle}
.grid{stroke:#2c3235;stroke-width:1}.ytick{fill:#8e8e9e;font-size:11px;text-anchor:end}
.xtick{fill:#8e8e9e;font-size:11px;text-anchor:middle}
.lhead{fill:#6e9fff;font-size:11px;text-anchor:end}.lname{fill:#ccccdc;font-size:11px}
.lval{fill:#ccccdc;font-size:11px;text-anchor:end}"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dashboard", type=Path, default=HERE / "outrider-spec-decode.json")
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--minutes", type=int, default=15, help="time range: the last N minutes")
    ap.add_argument("--end", type=float, default=None, help="range end, unix seconds (default: now)")
    ap.add_argument("--rate-interval", default="30s", help="what $__rate_interval becomes")
    ap.add_argument("--out", type=Path, default=HERE / "outrider-spec-decode.png")
    ap.add_argument("--html", type=Path, default=None, help="also keep the HTML page here")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = ap.parse_args(argv)

    dashboard = json.loads(args.dashboard.read_text())
    end = args.end or time.time()
    start = end - args.minutes * 60
    step = max(2, args.minutes * 60 // 300)
    variables = dashboard_variables(dashboard, args.rate_interval, step, args.minutes)
    width = 1600
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    height = bottom * (ROW_H + GAP) + 70
    svgs, empty = [], 0
    for panel in dashboard["panels"]:
        series = []
        for target in panel.get("targets", []):
            if target.get("hide"):
                continue
            expr = substitute(target["expr"], variables)
            result = query_range(args.prometheus, expr, start, end, step)
            print(f'{panel["title"]} [{target.get("refId")}]: {len(result)} series', file=sys.stderr)
            for r in result:
                pts = {float(t): (None if math.isnan(float(v)) or math.isinf(float(v)) else float(v))
                       for t, v in r["values"]}
                if any(v is not None for v in pts.values()):
                    series.append((legend(target.get("legendFormat", ""), r["metric"]), pts))
        empty += not series
        g = panel["gridPos"]
        w, h = g["w"] * COL_W - GAP, g["h"] * (ROW_H + GAP) - GAP
        svgs.append(f'<svg style="left:{g["x"] * COL_W + GAP / 2:.0f}px;top:{g["y"] * (ROW_H + GAP):.0f}px" '
                    f'width="{w:.0f}" height="{h:.0f}">{panel_svg(panel, series, w, h, start, end)}</svg>')
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(start)) + " to " + time.strftime("%H:%M %Z",
                                                                                         time.localtime(end))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(dashboard.get('title', ''))}</h1><div class='sub'>{when}; Prometheus "
            f"{html.escape(args.prometheus)}; $__rate_interval = {args.rate_interval}; all variables = All; "
            f"rendered from the dashboard JSON's queries by render_panels.py (not Grafana)</div>"
            f"<div class='grid-root'>{''.join(svgs)}</div></body></html>")
    with tempfile.TemporaryDirectory(prefix="render-panels-") as tmp:
        page_path = Path(args.html or Path(tmp) / "dashboard.html").resolve()
        page_path.write_text(page)
        cmd = [args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
               "--force-device-scale-factor=1", f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
               f"--screenshot={args.out.resolve()}", page_path.as_uri()]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    print(f"wrote {args.out} ({len(dashboard['panels'])} panels, {empty} without data)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
