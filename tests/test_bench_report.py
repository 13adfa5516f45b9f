"""bench/report.py: medians, ratios and target verdicts, the markdown section, the PNG."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from bench import report

RESULTS: dict[str, Any] = {
    "meta": {
        "date": "2026-11-25",
        "commit": "abc1234",
        "python": "3.11.7",
        "machine": "2 cores x86_64",
        "backend": "asyncio",
        "runs": 3,
        "seconds": 412.0,
        "versions": {"pynacl": "1.6.2", "anyio": "4.16", "libp2p": "0.2.x"},
    },
    "rows": [
        {
            "row": "bulk",
            "what": "one stream, 256 MiB, two processes",
            "unit": "MB/s",
            "higher_is_better": True,
            "values": {
                "capsock": [900.0, 870.0, 960.0],  # median 900
                "tcp": [3000.0, 1000.0, 2000.0],  # median 2000
                "tls": [750.0, 700.0, 800.0],  # median 750
                "libp2p": {"error": "libp2p not installed"},
            },
            "targets": [
                {"peer": "tls", "op": ">=", "ratio": 1.3},  # 1.20x: missed
                {"peer": "tcp", "op": ">=", "ratio": 0.4},  # 0.45x: met
                {"peer": "libp2p", "op": ">=", "ratio": 5.0},  # not measured
            ],
        },
        {
            "row": "setup",
            "what": "dial to first byte",
            "unit": "ms",
            "higher_is_better": False,
            "values": {"capsock": [2.0, 1.0, 3.0, 2.0], "tls": [4.0, 5.0, 3.0]},  # 2.0 and 4.0
            "targets": [
                {"peer": "tls", "op": "<=", "ratio": 0.5},  # 0.50x: met (bound inclusive)
                {"peer": "tls", "op": "<=", "ratio": 0.4},  # 0.50x: 25% over
            ],
        },
        {
            "row": "opens",
            "unit": "streams/s",
            "higher_is_better": True,
            "values": {"capsock": [18000, 19000, 17000], "libp2p": [900, 1000, 1100]},
            "targets": [{"peer": None, "op": ">=", "value": 20000}],  # 18,000: 10% short
        },
        {
            "row": "memory",
            "unit": "bytes",
            "higher_is_better": False,
            "values": {"capsock idle stream": [1040, 1050], "capsock idle session": [30000]},
            "targets": [
                {"subject": "capsock idle stream", "peer": None, "op": "<=", "value": 2048},
                {"subject": "capsock idle session", "peer": None, "op": "<=", "value": 32768},
            ],
        },
        {
            "row": "relay",
            "unit": "MB/s",
            "higher_is_better": True,
            "values": {"capsock relay": [540.0, 560.0, 500.0], "capsock": [900.0, 900.0, 880.0]},
            "targets": [
                {"subject": "capsock relay", "peer": "capsock", "op": ">=", "ratio": 0.6},
            ],
        },
    ],
}


def _rows() -> dict[str, dict[str, Any]]:
    return {row["row"]: row for row in report.summarize(RESULTS)}


def test_medians_and_spread_per_peer() -> None:
    rows = _rows()
    bulk = rows["bulk"]["peers"]
    assert bulk["capsock"] == {
        "median": 900.0,
        "min": 870.0,
        "max": 960.0,
        "runs": 3,
        "error": None,
    }
    assert bulk["tcp"]["median"] == 2000.0
    assert rows["setup"]["peers"]["capsock"]["median"] == 2.0  # even count: mean of the middle
    assert rows["memory"]["peers"]["capsock idle stream"]["median"] == 1045.0
    assert rows["bulk"]["higher_is_better"] is True
    assert rows["setup"]["higher_is_better"] is False


def test_ratio_targets_higher_is_better() -> None:
    tls, tcp, _ = _rows()["bulk"]["targets"]
    assert tls["measured"] == pytest.approx(1.2)
    assert tls["met"] is False
    assert tls["shortfall"] == "needs 1.30x, got 1.20x: 8% short"
    assert tcp["measured"] == pytest.approx(0.45)
    assert tcp["met"] is True
    assert tcp["shortfall"] is None


def test_ratio_targets_lower_is_better() -> None:
    inclusive, strict = _rows()["setup"]["targets"]
    assert inclusive["measured"] == pytest.approx(0.5)
    assert inclusive["met"] is True
    assert strict["met"] is False
    assert strict["shortfall"] == "needs 0.40x, got 0.50x: 25% over"


def test_absolute_targets_and_subjects() -> None:
    rows = _rows()
    (opens,) = rows["opens"]["targets"]
    assert opens["kind"] == "value"
    assert opens["measured"] == 18000
    assert opens["met"] is False
    assert opens["shortfall"] == "needs 20,000 streams/s, got 18,000 streams/s: 10% short"
    stream, session = rows["memory"]["targets"]
    assert stream["subject"] == "capsock idle stream"
    assert stream["measured"] == 1045.0
    assert stream["met"] is True
    assert session["met"] is True
    (relay,) = rows["relay"]["targets"]
    assert relay["measured"] == pytest.approx(540.0 / 900.0)
    assert relay["met"] is True


def test_error_or_missing_peer_is_not_measured() -> None:
    _, _, libp2p = _rows()["bulk"]["targets"]
    assert libp2p["met"] is None
    assert libp2p["measured"] is None
    assert libp2p["shortfall"] is None
    assert "libp2p not installed" in libp2p["reason"]

    results = copy.deepcopy(RESULTS)
    results["rows"][0]["targets"].append({"peer": "quic", "op": ">=", "ratio": 1.0})
    results["rows"][0]["values"]["tcp"] = []
    bulk = report.summarize(results)[0]
    assert bulk["targets"][-1]["met"] is None
    assert bulk["targets"][-1]["reason"] == "quic: not measured"
    assert bulk["targets"][1]["met"] is None  # tcp has no runs
    assert bulk["peers"]["tcp"]["error"] == "no runs"


def test_shortfall_rounds_small_misses_up_to_a_visible_amount() -> None:
    results = {
        "rows": [
            {
                "row": "x",
                "unit": "MB/s",
                "values": {"capsock": [1299.0], "tls": [1000.0]},
                "targets": [{"peer": "tls", "op": ">=", "ratio": 1.3}],
            }
        ]
    }
    (target,) = report.summarize(results)[0]["targets"]
    assert target["met"] is False
    assert target["shortfall"] == "needs 1.30x, got 1.30x: <1% short"


def test_unknown_op_is_rejected() -> None:
    results = copy.deepcopy(RESULTS)
    results["rows"][0]["targets"][0]["op"] = "=>"
    with pytest.raises(ValueError, match="unknown target op"):
        report.summarize(results)


def test_markdown_section() -> None:
    text = report.render_markdown(RESULTS)
    lines = text.splitlines()
    assert lines[0].startswith("Measured 2026-11-25 at commit `abc1234` on 2 cores x86_64")
    assert "asyncio backend" in lines[0]
    assert "median of 3 runs" in lines[0]
    # 9 targets: 5 met, 3 missed (bulk vs tls, setup at 0.4x, opens), 1 not measured
    assert "Targets met: **5 of 9** (1 not measured)." in text
    dash = report.RANGE
    assert f"| capsock | 900 | 870{dash}960 | 3 | — |" in text
    assert f"| tcp | 2,000 | 1,000{dash}3,000 | 3 | 0.45x |" in text
    assert "| libp2p | n/a (libp2p not installed) |  |  |  |" in text
    assert "| capsock ≥ 1.30x tls | 1.20x | ✗ needs 1.30x, got 1.20x: 8% short |" in text
    assert "| capsock ≥ 0.40x tcp | 0.45x | ✓ met |" in text
    assert "not measured (libp2p: libp2p not installed)" in text
    assert "| capsock ≥ 20,000 streams/s | 18,000 streams/s | ✗" in text
    assert "<" not in text.replace("<1%", "")  # no raw HTML
    assert "#" not in text  # no headings: the host page's table of contents stays as it is
    # Every table line has as many cells as its header line.
    for block in text.split("\n\n"):
        table = [line for line in block.splitlines() if line.startswith("|")]
        if table:
            widths = {line.count(" | ") for line in table}
            assert len(widths) == 1, block
    assert text.endswith("\n")


def test_markdown_escapes_pipes_and_newlines_in_reasons() -> None:
    results = copy.deepcopy(RESULTS)
    results["rows"][0]["values"]["libp2p"] = {"error": "import failed:\nNo module | x"}
    text = report.render_markdown(results)
    assert "n/a (import failed: No module \\| x)" in text


def test_markdown_embeds_the_png_link() -> None:
    text = report.render_markdown(RESULTS, png_link="img/bench.png")
    assert "(img/bench.png)" in text
    assert "![" in text


def test_update_markdown_file_is_idempotent_and_keeps_the_rest(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    page.write_text("# Performance\n\nIntro.\n", "utf-8")
    report.update_markdown_file(page, "first\n")
    once = page.read_text("utf-8")
    assert once == ("# Performance\n\nIntro.\n\n<!-- bench:begin -->\nfirst\n<!-- bench:end -->\n")
    report.update_markdown_file(page, "first\n")
    assert page.read_text("utf-8") == once

    page.write_text(once + "\n## After\n\nOutro.\n", "utf-8")
    report.update_markdown_file(page, "second\nsection")
    twice = page.read_text("utf-8")
    assert twice == (
        "# Performance\n\nIntro.\n\n<!-- bench:begin -->\nsecond\nsection\n"
        "<!-- bench:end -->\n\n## After\n\nOutro.\n"
    )
    report.update_markdown_file(page, "second\nsection")
    assert page.read_text("utf-8") == twice


def test_update_markdown_file_without_trailing_newline_or_file(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text", "utf-8")
    report.update_markdown_file(page, "s")
    assert page.read_text("utf-8") == "text\n\n<!-- bench:begin -->\ns\n<!-- bench:end -->\n"
    fresh = tmp_path / "new.md"
    report.update_markdown_file(fresh, "s")
    assert fresh.read_text("utf-8") == "<!-- bench:begin -->\ns\n<!-- bench:end -->\n"


def test_update_markdown_file_rejects_broken_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- bench:end -->\n<!-- bench:begin -->\n", "utf-8")
    with pytest.raises(ValueError, match="expected one"):
        report.update_markdown_file(page, "s")
    page.write_text("<!-- bench:begin -->\nonly the start\n", "utf-8")
    with pytest.raises(ValueError, match="expected one"):
        report.update_markdown_file(page, "s")


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_render_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    report.render_png(RESULTS, out)
    _check_png(out)


def test_render_png_copes_with_rows_that_have_nothing_measured(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = copy.deepcopy(RESULTS)
    results["rows"].append(
        {
            "row": "quic",
            "unit": "MB/s",
            "values": {"capsock": {"error": "crashed"}, "quic": {"error": "not installed"}},
            "targets": [{"peer": "quic", "op": ">=", "ratio": 1.0}],
        }
    )
    results["rows"].append({"row": "empty", "unit": "", "values": {}, "targets": []})
    out = tmp_path / "bench.png"
    report.render_png(results, out)
    _check_png(out)


def test_write_all(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "performance.md"
    page.write_text("# Performance\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n", "utf-8")
    json_path = tmp_path / "results" / "bench.json"
    png_path = docs / "img" / "bench.png"
    report.write_all(RESULTS, json_path, page, png_path)
    assert json.loads(json_path.read_text("utf-8")) == RESULTS
    assert json_path.read_text("utf-8").startswith('{\n  "meta"')
    _check_png(png_path)
    text = page.read_text("utf-8")
    assert "old" not in text
    assert "(img/bench.png)" in text
    assert text.startswith("# Performance\n\n<!-- bench:begin -->\nMeasured 2026-11-25")

    # A PNG outside the page's directory is not linked (a strict mkdocs build would fail).
    report.write_all(RESULTS, json_path, page, tmp_path / "bench.png")
    assert "bench.png)" not in page.read_text("utf-8")
