"""The bench must keep working: one quick pass of every row (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_quick_pass_measures_every_row(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-libp2p", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "bench" / "results-asyncio-quick.json").read_text())
    rows = {row["row"]: row for row in results["rows"]}
    expected = {"bulk", "parallel", "setup", "rtt", "opens", "memory", "relay"}
    assert expected <= set(rows)
    assert {"rpc sequential", "rpc 64-way"} <= set(rows)
    for name in expected:
        for peer, values in rows[name]["values"].items():
            if peer == "libp2p":
                assert values == {"error": "skipped (--no-libp2p)"}
                continue
            assert isinstance(values, list) and values, (name, peer, values)
            assert all(v > 0 for v in values), (name, peer, values)
    assert "**bulk**" in out.stdout  # the markdown report was printed
