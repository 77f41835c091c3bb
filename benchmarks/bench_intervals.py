"""Calibration of the evaluation intervals: how often the 95 % interval excludes the null on
null data (should be ~5 %, at most 7 %), and how often it finds a planted signal (power), for
the current method (patient bootstrap that refits) and the previous one (patient bootstrap of
one model's held-out predictions). The data and both methods are in
``tests/eval/calibration.py``.

Run in chunks (each well under the 4-minute slot of a shared machine); results accumulate in a
JSON file, one record per (kind, null/planted, seed), so a rerun skips what is done::

    python benchmarks/bench_intervals.py --kind probe-cv --seeds 0 50 --out intervals.json
    python benchmarks/bench_intervals.py --report --out intervals.json

Kinds: probe-cv, probe-few-shot, survival, compare-cv. ``--planted EFFECT`` measures power.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

# the calibration harness is the one tests/eval/test_intervals.py runs (imported as pytest does)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.eval import calibration as cal  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=sorted(cal.RUNS), default="probe-cv")
    p.add_argument("--seeds", type=int, nargs=2, default=[0, 200], metavar=("FROM", "TO"))
    p.add_argument("--planted", type=float, default=0.0, metavar="EFFECT",
                   help="measure power at this planted effect instead (0 = null data)")
    p.add_argument("--out", default="intervals.json")
    p.add_argument("--report", action="store_true", help="print the rates in --out and exit")
    args = p.parse_args()
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else []
    if args.report:
        _report(done)
        return 0
    have = {(r["kind"], r["planted"], r["seed"]) for r in done}
    run, null = cal.RUNS[args.kind]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(*args.seeds):
            if (args.kind, args.planted, seed) in have:
                continue
            cis = run(seed, args.planted)
            done.append({"kind": args.kind, "planted": args.planted, "seed": seed,
                         "null": null, "ci": {m: list(v) for m, v in cis.items()}})
            out.write_text(json.dumps(done))
    print(f"{args.kind} planted={args.planted} seeds {args.seeds}: "
          f"{time.perf_counter() - t0:.0f} s")
    _report(done)
    return 0


def _report(records: list[dict]) -> None:
    groups: dict[tuple, dict[str, list[bool]]] = {}
    for r in records:
        g = groups.setdefault((r["kind"], r["planted"]), {})
        for m, (lo, hi) in r["ci"].items():
            g.setdefault(m, []).append(lo > r["null"] or hi < r["null"])
    print(f"{'kind':16s} {'data':8s} {'method':6s} {'seeds':>5s} {'excludes null':>14s}")
    for (kind, planted), g in sorted(groups.items()):
        for m, hits in sorted(g.items()):
            print(f"{kind:16s} {planted or 'null':8} {m:6s} {len(hits):5d} "
                  f"{100 * sum(hits) / len(hits):13.1f}%")
    _size_adjusted(records)


def _size_adjusted(records: list[dict]) -> None:
    """Power at an equal false-positive rate: each method's intervals (as |centre - null| /
    half-width) scaled by the factor with which exactly 5 % of its null seeds exclude the
    null; a method whose intervals are too narrow no longer gains "power" from that."""
    import numpy as np

    def z(rs, m):
        lo = np.array([r["ci"][m][0] for r in rs])
        hi = np.array([r["ci"][m][1] for r in rs])
        return np.abs((lo + hi) / 2 - rs[0]["null"]) / np.maximum((hi - lo) / 2, 1e-12)

    kinds = sorted({r["kind"] for r in records})
    for kind in kinds:
        null = [r for r in records if r["kind"] == kind and not r["planted"]]
        for effect in sorted({r["planted"] for r in records if r["kind"] == kind} - {0.0}):
            hit = [r for r in records if r["kind"] == kind and r["planted"] == effect]
            if len(null) < 20 or not hit:
                continue
            for m in sorted(hit[0]["ci"]):
                k = float(np.quantile(z(null, m), 0.95))
                print(f"{kind:16s} {effect:<8} {m:6s} power at a 5 % false-positive rate: "
                      f"{100 * np.mean(z(hit, m) > k):.1f}% (scale {k:.2f}, {len(hit)} seeds)")


if __name__ == "__main__":
    sys.exit(main())
