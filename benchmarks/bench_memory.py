"""Peak memory of the whole process tree: `airflow-grid run --parallel 2` vs `GridSearchCV(n_jobs=2)`.

    python benchmarks/bench_memory.py [--rows 200000] [--features 50] [--repeats 1] [--smoke]

Data: ``make_classification(rows, features, random_state=0)`` as float64, saved to an npz file in a temp dir that
benchmarks/specs/memory_200k_x_50.yaml reads (``data.path`` filled in): 2 LogisticRegression candidates x 5 folds,
so both sides run the 2 candidates at once. Each side is sampled every 50 ms over its process and all its
descendants (see paired.py): summed RSS, which counts a memory-mapped snapshot once per process that reads it, and
summed PSS, which shares those pages among the processes (the tree's footprint). Scores are checked bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import numpy as np
import paired

TARGET = 0.5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="20,000 x 10, one repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.features, args.repeats = 20_000, 10, 1
    paired.header(
        "peak memory of the process tree" + (" [SMOKE]" if args.smoke else ""),
        [f"{args.rows:,} x {args.features} float64, 2 candidates at once: peak memory of the whole process tree "
         f"≤ {TARGET}x that of GridSearchCV(n_jobs=2)"],
    )  # fmt: skip
    from sklearn.datasets import make_classification

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        X, y = make_classification(
            n_samples=args.rows,
            n_features=args.features,
            n_informative=max(2, min(10, args.features // 2)),
            n_redundant=0,
            random_state=0,
        )
        data_path = f"{scratch}/data.npz"
        np.savez(data_path, X=X.astype(np.float64), y=y)
        print(f"data: {data_path}: X {X.shape} float64 = {X.nbytes / 2**20:.0f} MiB\n", flush=True)
        del X, y
        document = paired.load_spec_dict(paired.SPECS / "memory_200k_x_50.yaml")
        document["data"]["path"] = data_path
        spec = paired.write_spec(document, scratch, "memory")
        sides = ["ours", "sklearn"]
        runs: list[paired.Measured] = []
        by_side: dict[str, list[paired.Measured]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            measured = {}
            for side in paired.alternate(repeat, sides):
                where = f"{scratch}/{repeat}-{side}"
                if side == "ours":
                    measured[side] = paired.run_ours(spec, f"{where}/store", f"{where}/out")
                else:
                    measured[side] = paired.run_sklearn(spec, f"{where}.json")
            ours, theirs = measured["ours"], measured["sklearn"]
            assert ours.cv_results is not None and theirs.cv_results is not None
            cells = paired.check_scores(ours.cv_results, theirs.cv_results, f"memory repeat {repeat}")
            print(f"repeat {repeat}: scores identical ({cells} cells, bit for bit)")
            for side in sides:
                by_side[side].append(measured[side])
                runs.append(measured[side])
    print()
    print(paired.paired_table(runs))
    print()
    for kind in ("rss", "pss"):
        ours_peak = statistics.median(getattr(r, f"peak_{kind}") for r in by_side["ours"])
        their_peak = statistics.median(getattr(r, f"peak_{kind}") for r in by_side["sklearn"])
        ratio = ours_peak / their_peak
        print(
            f"peak {kind.upper()} of the process tree: airflow-grid run {paired.mib(ours_peak)}, GridSearchCV "
            f"{paired.mib(their_peak)}: ratio {ratio:.2f} [target ≤ {TARGET}: {paired.verdict(ratio, TARGET)}]"
        )
    for side in sides:
        last = by_side[side][-1]
        print(f"{last.side}, its processes at the PSS peak (last repeat):")
        for command, rss, pss in last.extra["at_peak"]:
            print(f"    RSS {paired.mib(rss):>9}  PSS {paired.mib(pss):>9}  {command}")
    peaks = [x.get("peak_rss_bytes", 0) for r in by_side["ours"] for x in r.extra["stored_results"]]
    print(f"each worker's own peak RSS (reported by the worker, ru_maxrss): {', '.join(paired.mib(p) for p in peaks)}")
    print("done")


if __name__ == "__main__":
    main()
