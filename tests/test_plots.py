"""The study's plots stay readable and cheap on large grids: the ranked chart shows the top candidates only."""

from __future__ import annotations

import struct

from airflow_grid.tracking.plots import TOP_RANKED, plots


def _png_size(png: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk follows the 8-byte signature
    return int(width), int(height)


def test_ranked_chart_height_does_not_grow_with_the_grid() -> None:
    def study(n: int) -> dict[str, list[object]]:
        return {
            "params": [{"max_depth": i % 7, "min_samples_leaf": i} for i in range(n)],
            "mean_test_score": [0.5 + (i % 13) / 100 for i in range(n)],
            "std_test_score": [0.01] * n,
            "rank_test_score": [1 + i for i in range(n)],
        }

    small, large = plots(study(TOP_RANKED), "score"), plots(study(20 * TOP_RANKED), "score")
    assert set(small) == set(large) == {"score_by_param.png", "ranked_candidates.png"}
    assert _png_size(large["ranked_candidates.png"]) == _png_size(small["ranked_candidates.png"])
    assert _png_size(large["ranked_candidates.png"])[1] < 2000  # ≈ 0.28 in per bar at 110 dpi, 50 bars
