"""A rerun with unchanged data: `airflow-grid run` a second time on the same result store fits nothing.

    python benchmarks/bench_rerun.py [digits iris pipeline] [--smoke]

For each workload (the specs of bench_cli.py): a first `airflow-grid run --parallel 2 --no-refit` on a fresh store,
then the same command on the same store into another output directory. The rerun must print "0 fitted", its
cv_results must equal the first run's bit for bit, and its wall time is compared with the first run's.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import bench_cli
import paired

TARGET = 0.10


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["digits", "iris"], help=f"some of {list(bench_cli.WORKLOADS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny grids and data")
    args = parser.parse_args(argv)
    paired.header(
        "rerun with unchanged data" + (" [SMOKE]" if args.smoke else ""),
        [f"a rerun with unchanged data fits nothing and takes ≤ {TARGET:.0%} of the first run's wall time"],
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as scratch:
        for name in args.workloads:
            spec_path, smoke, _ = bench_cli.WORKLOADS[name]
            document = paired.load_spec_dict(spec_path)
            if args.smoke:
                smoke(document)
            spec = paired.write_spec(document, scratch, name)
            store = f"{scratch}/{name}-store"
            first = paired.run_ours(spec, store, f"{scratch}/{name}-first", side="first run")
            again = paired.measure("rerun", paired.ours_command(spec, store, f"{scratch}/{name}-rerun"))
            again.cv_results = json.loads(Path(f"{scratch}/{name}-rerun/cv_results.json").read_text())
            counted = re.search(r"evaluated (\d+) candidates: (\d+) fitted, (\d+) from store", again.output)
            assert counted, f"no 'evaluated ...' line in the rerun's output:\n{again.output[-2000:]}"
            fitted = int(counted.group(2))
            assert first.cv_results is not None
            cells = paired.check_scores(again.cv_results, first.cv_results, f"{name} rerun vs first run")
            ratio = again.wall / first.wall
            print(
                f"{name}: first run {first.wall:.1f}s ({paired.n_candidates(first.cv_results)} candidates fitted), "
                f"rerun {again.wall:.1f}s: {counted.group(0)}; scores identical to the first run ({cells} cells, "
                f"bit for bit); rerun / first = {ratio:.3f} "
                f"[target: 0 fitted and ≤ {TARGET:.2f}: {'MET' if fitted == 0 and ratio <= TARGET else 'MISSED'}]",
                flush=True,
            )
            idle = paired.idle_worker_seconds(store)
            print(
                f"    one worker process that fits nothing (candidate 0, served from the store; best of 3): {idle:.2f}s"
            )
            rows.append([name, f"{first.wall:.1f}", f"{again.wall:.1f}", str(fitted), f"{ratio:.3f}", f"{idle:.2f}"])
    print()
    print(paired.table(rows, ["workload", "first run s", "rerun s", "rerun fitted", "rerun / first", "idle worker s"]))
    print("done: reruns fitted nothing and their scores are identical, bit for bit")


if __name__ == "__main__":
    main()
