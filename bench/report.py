"""Turn a bench results dict into a summary, a markdown section and a PNG plot.

The driver (``bench/__main__.py``) collects the measurements and hands over one
JSON-able dict::

    {
      "meta": {"date": ..., "commit": ..., "python": ..., "machine": ...,
               "backend": ..., "runs": 3, "seconds": 412.0,
               "versions": {"pynacl": "1.6.2", ...}},
      "rows": [
        {"row": "bulk", "what": "one stream, 256 MiB", "unit": "MB/s",
         "higher_is_better": True,
         "values": {"capsock": [885.0, 901.2, 870.0], "tcp": [...],
                    "libp2p": {"error": "libp2p not installed"}},
         "targets": [{"peer": "tls", "op": ">=", "ratio": 1.3},
                     {"peer": None, "op": ">=", "value": 800}]},
        ...
      ]
    }

Conventions: ``values`` maps a name ("peer") to one number per run, or to
``{"error": reason}`` when it could not be measured. A target compares
``median(subject) / median(peer)`` with ``ratio``, or, when ``peer`` is None,
``median(subject)`` with ``value``; ``subject`` defaults to ``"capsock"`` and
``op`` is one of ``>=``, ``<=``, ``>``, ``<``. A target whose subject or peer
has no measurement is "not measured" (``met`` is None).

Nothing here measures anything; the module is pure formatting (matplotlib is
imported only inside :func:`render_png`).
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import statistics
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BEGIN_MARKER",
    "END_MARKER",
    "render_markdown",
    "render_png",
    "summarize",
    "update_markdown_file",
    "write_all",
]

BEGIN_MARKER = "<!-- bench:begin -->"
END_MARKER = "<!-- bench:end -->"
DEFAULT_SUBJECT = "capsock"
RANGE = "\N{EN DASH}"  # between a row's min and max
LOG_SCALE_SPREAD = 20.0
_SUBJECT_COLOR, _PEER_COLOR = "#1f77b4", "#9a9a9a"
_MET_COLOR, _MISSED_COLOR = (
    "#2ca02c",
    "#d62728",
)  # a panel goes log-scale when its medians differ by more than this

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_OP_SYMBOL = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}

StrPath = str | os.PathLike[str]


# --------------------------------------------------------------------------- numbers


def fmt_number(value: float) -> str:
    """A measured number with about three significant digits (``25,000``, ``885``, ``0.42``)."""
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1 or magnitude == 0:
        return f"{value:.2f}"
    if magnitude >= 0.1:
        return f"{value:.3f}"
    return f"{value:.3g}"


def fmt_ratio(ratio: float) -> str:
    """A ratio as ``1.20x`` (``31.9x``, ``150x``, ``0.0420x`` at the extremes)."""
    if not math.isfinite(ratio):
        return f"{ratio}x"
    magnitude = abs(ratio)
    if magnitude >= 100:
        return f"{ratio:.0f}x"
    if magnitude >= 10:
        return f"{ratio:.1f}x"
    if magnitude >= 0.1 or magnitude == 0:
        return f"{ratio:.2f}x"
    return f"{ratio:.3g}x"


def _fmt_with_unit(value: float, unit: str) -> str:
    return f"{fmt_number(value)} {unit}".rstrip()


# --------------------------------------------------------------------------- summary


def _measure(entry: object) -> dict[str, Any]:
    """Median, spread and run count of one ``values`` entry, or the reason there are none."""
    if isinstance(entry, Mapping):
        reason = entry.get("error", "no measurement")
        return {"median": None, "min": None, "max": None, "runs": 0, "error": str(reason)}
    if isinstance(entry, str | bytes) or not isinstance(entry, Sequence):
        raise TypeError(f"a values entry must be a list of numbers or an error dict: {entry!r}")
    runs = [float(v) for v in entry]
    if not runs:
        return {"median": None, "min": None, "max": None, "runs": 0, "error": "no runs"}
    return {
        "median": statistics.median(runs),
        "min": min(runs),
        "max": max(runs),
        "runs": len(runs),
        "error": None,
    }


def _shortfall(op: str, target: float, measured: float, render: Callable[[float], str]) -> str:
    """``needs 1.30x, got 1.20x: 8% short`` (``over`` when the bound is an upper one)."""
    if target == 0:
        amount = ""
    else:
        percent = abs(measured - target) / abs(target) * 100
        amount = "<1%" if round(percent) == 0 else f"{round(percent)}%"
    word = "short" if op in (">=", ">") else "over"
    text = f"needs {render(target)}, got {render(measured)}"
    return f"{text}: {amount} {word}" if amount else f"{text}: {word}"


def _not_measured(name: str, peer: Mapping[str, Any] | None) -> str:
    if peer is None:
        return f"{name}: not measured"
    return f"{name}: {peer['error']}"


def _evaluate_target(
    target: Mapping[str, Any], peers: Mapping[str, Mapping[str, Any]], unit: str
) -> dict[str, Any]:
    subject = str(target.get("subject") or DEFAULT_SUBJECT)
    peer = target.get("peer")
    op = str(target["op"])
    if op not in _OPS:
        raise ValueError(f"unknown target op {op!r} (expected one of {sorted(_OPS)})")
    kind = "value" if peer is None else "ratio"
    if kind not in target:
        raise ValueError(f"target {dict(target)!r}: a peer of {peer!r} needs a {kind!r} key")
    goal = float(target[kind])
    out: dict[str, Any] = {
        "subject": subject,
        "peer": peer,
        "op": op,
        "kind": kind,
        "target": goal,
        "measured": None,
        "met": None,
        "shortfall": None,
        "reason": None,
    }

    def render(number: float) -> str:
        return fmt_ratio(number) if kind == "ratio" else _fmt_with_unit(number, unit)

    out["label"] = f"{subject} {_OP_SYMBOL[op]} {render(goal)}"
    if kind == "ratio":
        out["label"] += f" {peer}"

    reasons = []
    names = [subject] if peer is None else [subject, str(peer)]
    for name in names:
        found = peers.get(name)
        if found is None or found["median"] is None:
            reasons.append(_not_measured(name, found))
    if not reasons and kind == "ratio" and peers[str(peer)]["median"] == 0:
        reasons.append(f"{peer}: median is 0")
    if reasons:
        out["reason"] = "; ".join(reasons)
        return out

    measured = float(peers[subject]["median"])
    if kind == "ratio":
        measured /= float(peers[str(peer)]["median"])
    out["measured"] = measured
    out["met"] = _OPS[op](measured, goal)
    if not out["met"]:
        out["shortfall"] = _shortfall(op, goal, measured, render)
    return out


def summarize(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Medians per peer and the verdict on every target, one dict per row.

    Each returned dict holds ``row``, ``what``, ``unit``, ``higher_is_better``,
    ``peers`` (name -> ``{"median", "min", "max", "runs", "error"}``; numbers
    are None and ``error`` says why when a peer was not measured) and
    ``targets``: a list of ``{"subject", "peer", "op", "kind" ("ratio" or
    "value"), "target", "label", "measured", "met", "shortfall", "reason"}``,
    where ``measured`` is the ratio of medians (or the subject's median for an
    absolute target), ``met`` is None when it could not be measured (then
    ``reason`` says why), and ``shortfall`` reads like ``needs 1.30x, got 1.20x:
    8% short`` when the target is missed.
    """
    summary: list[dict[str, Any]] = []
    for row in results.get("rows", []):
        unit = str(row.get("unit", ""))
        peers = {str(name): _measure(entry) for name, entry in row.get("values", {}).items()}
        summary.append(
            {
                "row": str(row["row"]),
                "what": str(row.get("what", "")),
                "unit": unit,
                "higher_is_better": bool(row.get("higher_is_better", True)),
                "peers": peers,
                "targets": [_evaluate_target(t, peers, unit) for t in row.get("targets", [])],
            }
        )
    return summary


# --------------------------------------------------------------------------- markdown


def _cell(text: object) -> str:
    """Text safe inside a GitHub-flavoured table cell (no pipes, no newlines)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _reference(row: Mapping[str, Any]) -> str | None:
    """The name the row's ratio column divides by the others: the first ratio target's subject."""
    for target in row["targets"]:
        if target["kind"] == "ratio":
            return str(target["subject"])
    return DEFAULT_SUBJECT if DEFAULT_SUBJECT in row["peers"] else None


def _meta_line(meta: Mapping[str, Any]) -> str:
    parts = []
    if meta.get("date"):
        parts.append(f"Measured {meta['date']}")
    else:
        parts.append("Measured")
    if meta.get("commit"):
        parts.append(f"at commit `{meta['commit']}`")
    if meta.get("machine"):
        parts.append(f"on {meta['machine']}")
    head = " ".join(parts)
    details = []
    if meta.get("backend"):
        details.append(f"{meta['backend']} backend")
    if meta.get("runs"):
        details.append(f"median of {meta['runs']} runs")
    if details:
        head += ", " + ", ".join(details)
    extras = []
    if meta.get("python"):
        extras.append(f"Python {meta['python']}")
    versions = meta.get("versions") or {}
    extras.extend(f"{name} {version}" for name, version in versions.items())
    groups = [", ".join(extras)] if extras else []
    if meta.get("seconds") is not None:
        groups.append(f"{float(meta['seconds']):.0f} s in total")
    if groups:
        head += f" ({'; '.join(groups)})"
    return head + "."


def _row_markdown(row: Mapping[str, Any]) -> list[str]:
    unit = row["unit"]
    direction = "higher is better" if row["higher_is_better"] else "lower is better"
    title = f"**{row['row']}**"
    if row["what"]:
        title += f" — {row['what']}"
    title += f" ({unit}, {direction})" if unit else f" ({direction})"
    lines = [_cell(title), ""]

    reference = _reference(row)
    ref_median: float | None = None
    if reference is not None and reference in row["peers"]:
        ref_median = row["peers"][reference]["median"]
    show_ratio = ref_median is not None and len(row["peers"]) > 1

    header = ["", f"median ({unit})" if unit else "median", f"min{RANGE}max", "runs"]
    align = ["---", "---:", "---:", "---:"]
    if show_ratio:
        header.append(f"{reference} ÷ this")
        align.append("---:")
    lines.append("| " + " | ".join(_cell(h) for h in header) + " |")
    lines.append("| " + " | ".join(align) + " |")
    for name, peer in row["peers"].items():
        if peer["median"] is None:
            cells = [name, f"n/a ({peer['error']})", "", ""]
            if show_ratio:
                cells.append("")
        else:
            spread = f"{fmt_number(peer['min'])}{RANGE}{fmt_number(peer['max'])}"
            cells = [name, fmt_number(peer["median"]), spread, str(peer["runs"])]
            if show_ratio:
                if name == reference:
                    cells.append("—")
                elif ref_median is None or peer["median"] == 0:
                    cells.append("")
                else:
                    cells.append(fmt_ratio(ref_median / peer["median"]))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")

    if row["targets"]:
        lines += ["", "| target | measured | result |", "| --- | ---: | --- |"]
        for target in row["targets"]:
            if target["met"] is None:
                measured = "n/a"
                result = f"— not measured ({target['reason']})"
            else:
                if target["kind"] == "ratio":
                    measured = fmt_ratio(target["measured"])
                else:
                    measured = _fmt_with_unit(target["measured"], unit)
                result = "✓ met" if target["met"] else f"✗ {target['shortfall']}"
            cells = [target["label"], measured, result]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def render_markdown(results: Mapping[str, Any], *, png_link: str | None = None) -> str:
    """A markdown section for the results: a meta line, a tally, then two tables per row.

    Per row, the first table lists each peer's median, the runs' min-max and,
    when the row has a reference (the first ratio target's subject, else
    ``capsock``), that reference's median divided by each peer's; the second
    lists the targets with the measured ratio or value and ✓ / ✗ (with the
    shortfall) / "not measured". ``png_link``, if given, is embedded as an
    image after the tally (a path relative to the markdown file). Plain
    GitHub-flavoured markdown, no headings (so the host page's table of
    contents is untouched), no HTML; ends with a newline.
    """
    summary = summarize(results)
    meta = results.get("meta", {})
    targets = [t for row in summary for t in row["targets"]]
    met = sum(1 for t in targets if t["met"] is True)
    unmeasured = sum(1 for t in targets if t["met"] is None)
    tally = f"Targets met: **{met} of {len(targets)}**"
    if unmeasured:
        tally += f" ({unmeasured} not measured)"
    lines = [_meta_line(meta), "", tally + "."]
    if png_link is not None:
        lines += [
            "",
            f"![bench results: medians per row, bars show the runs' min{RANGE}max]({png_link})",
        ]
    for row in summary:
        lines.append("")
        lines.extend(_row_markdown(row))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- PNG


def render_png(results: Mapping[str, Any], path: StrPath) -> None:
    """Plot one panel per row: median per peer as bars, min-max as error bars.

    The subject of the row's targets is drawn in blue, the peers in grey, and a
    peer that was not measured gets an "n/a" label instead of a bar. A panel
    whose medians differ by more than 20x uses a log scale. Each target that
    implies a level for its subject (an absolute value, or the peer's median
    times the ratio) is marked on the subject's bar with a short dashed line,
    green when met and red when not. About 1200x800 px for up to six rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    count = max(len(summary), 1)
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.0 * ncols, 4.0 * nrows), dpi=100, squeeze=False
    )
    try:
        flat = [ax for line in axes for ax in line]
        for ax in flat[len(summary) :]:
            ax.set_visible(False)
        if not summary:
            flat[0].set_visible(True)
            flat[0].axis("off")
            flat[0].text(0.5, 0.5, "no rows", ha="center", va="center")
        for ax, row in zip(flat, summary, strict=False):
            _panel(ax, row)
        meta = results.get("meta", {})
        title = " · ".join(
            str(part)
            for part in (
                meta.get("date"),
                meta.get("commit"),
                meta.get("machine"),
                meta.get("backend"),
                f"median of {meta['runs']} runs" if meta.get("runs") else None,
            )
            if part
        )
        if title:
            fig.suptitle(title, fontsize=11)
        fig.text(
            0.5,
            0.005,
            f"bars: median of the runs, whiskers: min{RANGE}max; dashed: the level a target asks of"
            " the blue bar (green met, red missed); below each panel: ✓ met, ✗ missed,"
            f" {RANGE} not measured",
            ha="center",
            va="bottom",
            fontsize=8,
            color="#555555",
        )
        fig.tight_layout(rect=(0, 0.025, 1, 1))
        fig.savefig(os.fspath(path), format="png")
    finally:
        plt.close(fig)


def _panel(ax: Any, row: Mapping[str, Any]) -> None:
    """One row's bar chart on ``ax``."""
    names = list(row["peers"])
    peers = row["peers"]
    subjects = {str(t["subject"]) for t in row["targets"]} or {DEFAULT_SUBJECT}
    xs = list(range(len(names)))
    measured = [
        (x, peers[n]) for x, n in zip(xs, names, strict=True) if peers[n]["median"] is not None
    ]
    medians = [p["median"] for _, p in measured if p["median"] > 0]
    log = bool(medians) and max(medians) / min(medians) > LOG_SCALE_SPREAD
    if log:
        ax.set_yscale("log")

    for x, peer in measured:
        name = names[x]
        median = float(peer["median"])
        ax.bar(
            x,
            median,
            width=0.6,
            color=_SUBJECT_COLOR if name in subjects else _PEER_COLOR,
            yerr=[[median - peer["min"]], [peer["max"] - median]],
            capsize=4,
            ecolor="#333333",
        )
        ax.annotate(
            fmt_number(median),
            (x, float(peer["max"])),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )

    levels: list[float] = []
    notes: list[str] = []
    for target in row["targets"]:
        mark = {True: "✓", False: "✗", None: RANGE}[target["met"]]
        goal = target["label"].removeprefix(f"{target['subject']} ")
        if len(subjects) > 1:
            goal = f"{target['subject']} {goal}"
        notes.append(f"{mark} {goal}")
        level = _target_level(target, peers)
        if level is None or target["subject"] not in names:
            continue
        levels.append(level)
        x = names.index(target["subject"])
        ax.hlines(
            level,
            x - 0.42,
            x + 0.42,
            colors=_MET_COLOR if target["met"] else _MISSED_COLOR,
            linestyles="dashed",
            linewidth=1.5,
        )

    highs = [float(p["max"]) for _, p in measured] + levels
    top = max(highs, default=1.0)
    if log:
        bottom = min(v for v in [float(p["min"]) for _, p in measured] + levels if v > 0)
        ax.set_ylim(bottom / 3, top * 4)
        y_na = bottom / 2
    else:
        top = top if top > 0 else 1.0
        ax.set_ylim(0, top * 1.18)
        y_na = top * 0.04
    for x, name in enumerate(names):
        if peers[name]["median"] is None:
            ax.text(x, y_na, "n/a", ha="center", va="bottom", fontsize=9, color=_MISSED_COLOR)

    ax.set_xticks(xs)
    ax.set_xticklabels([textwrap.fill(n, 12) for n in names], fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    if notes:
        ax.set_xlabel(_wrap_items(notes, 58), fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    arrow = "↑" if row["higher_is_better"] else "↓"
    ax.set_title(f"{row['row']} ({row['unit']}) {arrow}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _wrap_items(items: Sequence[str], width: int) -> str:
    """Join items with spaces into lines of about ``width`` characters, never splitting one."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 3 + len(item) <= width:
            lines[-1] += "   " + item
        else:
            lines.append(item)
    return "\n".join(lines)


def _target_level(
    target: Mapping[str, Any], peers: Mapping[str, Mapping[str, Any]]
) -> float | None:
    """The median the target asks of its subject, if it can be drawn."""
    if target["kind"] == "value":
        return float(target["target"])
    peer = peers.get(str(target["peer"]))
    if peer is None or peer["median"] is None:
        return None
    return float(peer["median"]) * float(target["target"])


# --------------------------------------------------------------------------- files


def update_markdown_file(path: StrPath, section: str) -> None:
    """Put ``section`` between the bench markers of a markdown file.

    The markers (``<!-- bench:begin -->`` and ``<!-- bench:end -->``) must
    each stand on a line of their own; the text between them is replaced and
    everything outside is kept byte for byte. A file without the markers gets
    them appended at its end (a missing file is created). Idempotent: a second
    call with the same section leaves the file unchanged (it is not rewritten).
    Raises ValueError when the markers appear more than once or out of order.
    """
    target = Path(path)
    text = target.read_text("utf-8") if target.exists() else ""
    block = f"{BEGIN_MARKER}\n{section.strip(chr(10))}\n{END_MARKER}"
    begins = list(re.finditer(rf"^[ \t]*{re.escape(BEGIN_MARKER)}[ \t]*$", text, re.M))
    ends = list(re.finditer(rf"^[ \t]*{re.escape(END_MARKER)}[ \t]*$", text, re.M))
    if not begins and not ends:
        if text and not text.endswith("\n"):
            text += "\n"
        new = f"{text}\n{block}\n" if text else f"{block}\n"
    elif len(begins) == 1 and len(ends) == 1 and begins[0].start() < ends[0].start():
        new = text[: begins[0].start()] + block + text[ends[0].end() :]
    else:
        raise ValueError(
            f"{target}: expected one {BEGIN_MARKER!r} line followed by one {END_MARKER!r} line"
        )
    if new != text:
        target.write_text(new, "utf-8")


def write_all(
    results: Mapping[str, Any], json_path: StrPath, md_path: StrPath, png_path: StrPath
) -> None:
    """Write the results JSON (indent=2), the PNG, and the section of the markdown file.

    The section embeds the PNG (by a path relative to the markdown file) when
    the PNG lies in the markdown file's directory or below it, so that a
    strict mkdocs build can resolve it; otherwise the image is left out.
    Parent directories of the JSON and PNG files are created.
    """
    json_file, png_file, md_file = Path(json_path), Path(png_path), Path(md_path)
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    png_file.parent.mkdir(parents=True, exist_ok=True)
    render_png(results, png_file)
    link = Path(os.path.relpath(png_file.resolve(), md_file.resolve().parent)).as_posix()
    png_link = None if link.startswith("../") else link
    update_markdown_file(md_file, render_markdown(results, png_link=png_link))
