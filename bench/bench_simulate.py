"""Generation speed of the simulator: events per second for a population size (target: 1M events well < 60 s).

.venv/bin/python bench/bench_simulate.py --people 100000 --out /tmp/omnistitch-sim
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
from pathlib import Path

from streams.simulate import SimConfig, simulate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--people", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="omnistitch-sim-"))
    summary = simulate(SimConfig(people=args.people, days=args.days, seed=args.seed), out)
    if args.out is None:  # a gigabyte of throwaway files: keep them only when asked to
        shutil.rmtree(out)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"people={summary.people} events={summary.events} unique={summary.unique_events} "
        f"seconds={summary.seconds:.1f} events_per_s={summary.events / summary.seconds:,.0f} "
        f"all_jsonl_mb={summary.bytes_all / 1e6:.0f} total_mb={summary.bytes_total / 1e6:.0f} "
        f"max_rss_mb={rss_mb:.0f}" + (f" out={out}" if args.out else "")
    )


if __name__ == "__main__":
    main()
