"""``make bench``: run every bench/*.py with --json and write bench/RESULTS.md.

Each script prints one JSON object as its last stdout line (DESIGN.md's report shape); this
collects them into one Markdown table of targets, plus the raw reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))
    reports, failures = [], []
    for script in scripts:
        print(f"[bench] {script.name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        try:
            report = json.loads(lines[-1])
            report["seconds"] = round(time.monotonic() - t0, 1)
            reports.append(report)
        except (IndexError, json.JSONDecodeError):
            failures.append(f"{script.name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    out = ["# Benchmark results", "", f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench`.", ""]
    if reports:
        out += [f"Machine: `{json.dumps(reports[0]['machine'])}`", "", "| bench | target | value | limit | met |", "|---|---|---|---|---|"]
        for r in reports:
            for key, t in r["targets"].items():
                out.append(f"| {r['bench']} | {key} | {t['value']} | {t['op']} {t['limit']} | {'yes' if t['met'] else '**no**'} |")
        out += ["", "## Reports", ""]
        for r in reports:
            out += [f"### {r['bench']} ({r['seconds']} s)", "", "```json", json.dumps(r["metrics"], indent=2), "```", ""]
    if failures:
        out += ["## Failed to run", ""] + [f"```\n{f}\n```" for f in failures]
    (HERE / "RESULTS.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
