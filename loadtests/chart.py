"""Chart of a bench.py run: req/s per arm (median and the range over passes) and the CPU per
request, from ``bench.py --json FILE``.

    .venv/bin/python loadtests/chart.py FILE.json OUT.png
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ORDER = ("A", "N", "B", "C", "Cfn", "Creject", "D-fixed", "D-moving", "D-sliding")


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(argv[0]).read_text())
    samples = data["samples"]
    arms = [a for a in ORDER if a in samples]
    rps = [[s["wrk"]["rps"] for s in samples[a]] for a in arms]
    cpu = [[s["cpu_us_per_req"] for s in samples[a] if s["cpu_us_per_req"]] for a in arms]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5))
    medians = [statistics.median(v) for v in rps]
    top.bar(arms, medians, color=["#888" if a in ("A", "N") else "#2a7" if a.startswith("C")
                                  else "#57c" if a == "B" else "#c75" for a in arms])
    top.errorbar(arms, medians, yerr=[[m - min(v) for m, v in zip(medians, rps, strict=True)],
                                      [max(v) - m for m, v in zip(medians, rps, strict=True)]],
                 fmt="none", ecolor="black", capsize=3, linewidth=1)
    for x, m in enumerate(medians):
        top.text(x, m, f"{m:,.0f}", ha="center", va="bottom", fontsize=8)
    top.set_ylabel("requests/s (median, range)")
    top.set_title(f"quotagate bench: {len(rps[0])} interleaved passes, "
                  f"{data['args']['connections']} connections", fontsize=10)
    shown = [(a, v) for a, v in zip(arms, cpu, strict=True) if v]
    bottom.bar([a for a, _ in shown], [statistics.median(v) for _, v in shown], color="#57c")
    bottom.set_ylabel("proxy CPU µs / request")
    fig.tight_layout()
    fig.savefig(argv[1], dpi=90)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
