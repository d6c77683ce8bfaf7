"""``make bench``: run bench/*.py with --json and write bench/RESULTS.md.

    python bench/run_all.py [NAME ...]      # default: every bench; NAME is e.g. fleet

Each script prints one JSON object as its last stdout line (DESIGN.md's report shape). A
run saves it as ``bench/results/NAME.json``; RESULTS.md is then written from every saved
report, so re-running one bench (a long one, or after a change) keeps the others' latest
figures, each with the time it was measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAVED = HERE / "results"


def scripts() -> dict[str, Path]:
    return {p.stem: p for p in sorted(HERE.glob("*.py")) if p.name != Path(__file__).name and not p.name.startswith("_")}


def run(script: Path) -> tuple[dict | None, str | None]:
    print(f"[bench] {script.name} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return None, f"{script.name}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return report, None


def render(reports: list[dict], failures: list[str]) -> str:
    out = ["# Benchmark results", "", "Written by `make bench` (`python bench/run_all.py [NAME ...]` re-runs some).", ""]
    if reports:
        out += ["| bench | measured | target | value | limit | met |", "|---|---|---|---|---|---|"]
        for r in reports:
            for key, t in r["targets"].items():
                out.append(f"| {r['bench']} | {r.get('measured', '?')} | {key} | {t['value']} | {t['op']} {t['limit']} "
                           f"| {'yes' if t['met'] else '**no**'} |")
        out += ["", "## Reports", ""]
        for r in reports:
            out += [f"### {r['bench']} ({r['seconds']} s, {r.get('measured', '?')})", "",
                    f"Machine: `{json.dumps(r['machine'])}`", "", "```json", json.dumps(r["metrics"], indent=2), "```", ""]
    if failures:
        out += ["## Failed to run", ""] + [f"```\n{f}\n```" for f in failures]
    return "\n".join(out) + "\n"


def main() -> int:
    known = scripts()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benches to run (default all: {', '.join(known)})")
    args = ap.parse_args()
    unknown = [n for n in args.names if n not in known]
    if unknown:
        ap.error(f"no bench named {', '.join(unknown)}; there are: {', '.join(known)}")
    SAVED.mkdir(exist_ok=True)
    failures = []
    for name in args.names or list(known):
        report, failure = run(known[name])
        if report is not None:
            (SAVED / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        else:
            failures.append(failure)
    reports = [json.loads(p.read_text()) for p in sorted(SAVED.glob("*.json")) if p.stem in known]
    text = render(reports, failures)
    (HERE / "RESULTS.md").write_text(text)
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
