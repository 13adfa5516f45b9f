"""The bench: every row, capsock next to what a user would otherwise use, one command.

    .venv/bin/python -m bench                # all rows, 3 runs each, asyncio; ~5 min
    .venv/bin/python -m bench --rows rtt,setup --runs 5
    .venv/bin/python -m bench --quick        # tiny sizes, 1 run: checks the bench works
    .venv/bin/python -m bench --backend both # asyncio rows, then the trio rows

Every row runs each of its peers once per run, interleaved (capsock, tls, tcp,
capsock, ...) so that drift on this noisy machine hits every peer alike; the
report gives the median of the runs, their spread, the ratios and the
targets of the performance issue.  Results go to ``docs/bench/results.json``,
``docs/img/bench.png`` and the generated section of ``docs/performance.md``
(``--no-write`` prints the markdown only).  Server and client are always two
processes on loopback; see ``bench/throughput.py``, ``bench/latency.py``,
``bench/memory.py``, ``bench/rpc.py`` and ``bench/libp2p_peer.py`` for how
each number is taken.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import latency, libp2p_peer, memory, report, rpc, throughput

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("bulk", "parallel", "setup", "rtt", "opens", "memory", "relay", "rpc", "nat")

Values = dict[str, list[float] | dict[str, str]]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        return out.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"


class Bench:
    """Runs the rows; one instance per invocation."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.runs: int = args.runs
        self.backend: str = args.backend
        self.quick: bool = args.quick
        self.libp2p_reason = "skipped (--no-libp2p)" if args.no_libp2p else libp2p_peer.available()
        throughput.make_cert(workdir)
        self._relay: tuple[subprocess.Popen[str], str] | None = None

    # ------------------------------------------------------------ helpers

    def interleave(self, peers: dict[str, Callable[[], float]]) -> Values:
        """Each peer once per run, in turn; a failing peer records its error."""
        values: Values = {name: [] for name in peers}
        for run in range(self.runs):
            for name, measure in peers.items():
                entry = values[name]
                if isinstance(entry, dict):
                    continue  # failed before: do not retry
                try:
                    entry.append(measure())
                except Exception as exc:  # a peer's failure must not sink the bench
                    traceback.print_exc()
                    values[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                print(f"  run {run + 1}/{self.runs} {name}: {_last(values[name])}", flush=True)
        return values

    def libp2p(self, row: str, convert: float = 1.0, size_mib: int = 256) -> Callable[[], float]:
        def measure() -> float:
            if self.libp2p_reason is not None:
                raise RuntimeError(self.libp2p_reason)
            (value,) = libp2p_peer.measure(row, runs=1, size_mib=size_mib)
            return value * convert

        return measure

    def with_libp2p(self, peers: dict[str, Callable[[], float]], row: str, **kw: Any) -> None:
        if self.libp2p_reason is None:
            peers["libp2p"] = self.libp2p(row, **kw)

    def libp2p_values(self, values: Values) -> Values:
        if self.libp2p_reason is not None:
            values["libp2p"] = {"error": self.libp2p_reason}
        return values

    def relay_uri(self) -> str:
        if self._relay is None:
            self._relay = throughput.start_relay(self.workdir)
        return self._relay[1]

    def close(self) -> None:
        if self._relay is not None:
            proc = self._relay[0]
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def size(self) -> int:
        return 8 if self.quick else self.args.size

    def bulk_of(self, kind: str, streams: int = 1) -> Callable[[], float]:
        return lambda: throughput.run_once(
            kind, self.size(), self.backend, self.workdir, self.relay_uri(), streams
        )

    def latency_of(self, row: str, kind: str, count: int | None = None) -> Callable[[], float]:
        if self.quick:
            count = {"setup": 3, "rtt": 100, "opens": 200}[row]
        return lambda: latency.run(
            row, kind, backend=self.backend, count=count, workdir=self.workdir
        )

    # ------------------------------------------------------------ rows

    def bulk(self) -> dict[str, Any]:
        libp2p_size = 8 if self.quick else self.args.libp2p_size
        peers = {k: self.bulk_of(k) for k in ("capsock", "tls", "tcp")}
        self.with_libp2p(peers, "bulk", size_mib=libp2p_size)
        return {
            "what": f"one stream, {self.size()} MiB, sender and receiver in two processes"
            f" (py-libp2p: {libp2p_size} MiB)",
            "unit": "MB/s",
            "higher_is_better": True,
            "values": self.libp2p_values(self.interleave(peers)),
            "targets": [
                {"peer": "tls", "op": ">=", "ratio": 1.5},
                {"peer": "tcp", "op": ">=", "ratio": 0.6},
                {"peer": "libp2p", "op": ">=", "ratio": 5.0},
            ],
        }

    def parallel(self) -> dict[str, Any]:
        libp2p_size = 8 if self.quick else self.args.libp2p_size
        peers = {k: self.bulk_of(k, streams=8) for k in ("capsock", "tls", "tcp")}
        self.with_libp2p(peers, "parallel", size_mib=libp2p_size)
        return {
            "what": f"8 streams at once, {self.size()} MiB in all; capsock and py-libp2p:"
            " one session; tcp and tls: 8 connections",
            "unit": "MB/s",
            "higher_is_better": True,
            "values": self.libp2p_values(self.interleave(peers)),
            "targets": [],
        }

    def setup(self) -> dict[str, Any]:
        peers = {k: self.latency_of("setup", k) for k in ("capsock", "tls", "tcp")}
        self.with_libp2p(peers, "setup", convert=1e3)
        return {
            "what": "fresh dial to the first echoed byte (TCP + handshake + stream open);"
            " median of 30 dials",
            "unit": "ms",
            "higher_is_better": False,
            "values": self.libp2p_values(self.interleave(peers)),
            "targets": [
                {"peer": "tls", "op": "<=", "ratio": 0.5},
                {"peer": "libp2p", "op": "<=", "ratio": 0.5},
            ],
        }

    def rtt(self) -> dict[str, Any]:
        peers = {k: self.latency_of("rtt", k) for k in ("capsock", "tcp", "tls")}
        self.with_libp2p(peers, "rtt")
        return {
            "what": "1 KiB echoed on an open stream; median round trip of 3,000",
            "unit": "µs",
            "higher_is_better": False,
            "values": self.libp2p_values(self.interleave(peers)),
            "targets": [{"peer": "tcp", "op": "<=", "ratio": 1.2}],
        }

    def opens(self) -> dict[str, Any]:
        count = 200 if self.quick else 3000

        def capsock_opens(concurrency: int) -> Callable[[], float]:
            return lambda: latency.run(
                "opens", "capsock", backend=self.backend, concurrency=concurrency,
                count=count, workdir=self.workdir,
            )  # fmt: skip

        peers = {"capsock": capsock_opens(8), "capsock sequential": capsock_opens(1)}
        self.with_libp2p(peers, "opens")
        return {
            "what": "new streams per second on one session: open (accepted by the listener),"
            " one byte echoed, close; 8 at a time (capsock and py-libp2p), and one at a time",
            "unit": "streams/s",
            "higher_is_better": True,
            "values": self.libp2p_values(self.interleave(peers)),
            "targets": [
                {"peer": None, "op": ">=", "value": 10_000},
                {"subject": "capsock sequential", "peer": None, "op": ">=", "value": 3_000},
            ],
        }

    def memory(self) -> dict[str, Any]:
        streams = 1000 if self.quick else 10_000
        sessions = 20 if self.quick else 300

        def per_stream() -> float:
            out = _json_run(["bench.memory", "stream", "--count", str(streams)], self.backend)
            return float(out["bytes_per_stream_both_ends"])

        def per_session() -> float:
            return float(memory.idle_sessions(sessions, self.backend)["rss_per_session"])

        return {
            "what": f"idle stream: {streams:,} streams on one session, tracemalloc, both ends"
            f" together; idle session: RSS growth of a node holding {sessions} idle sessions",
            "unit": "bytes",
            "higher_is_better": False,
            "values": self.interleave(
                {"capsock idle stream": per_stream, "capsock idle session": per_session}
            ),
            "targets": [
                {"subject": "capsock idle stream", "peer": None, "op": "<=", "value": 2048},
                {"subject": "capsock idle session", "peer": None, "op": "<=", "value": 65536},
            ],
        }

    def relay(self) -> dict[str, Any]:
        peers = {"capsock relay": self.bulk_of("relay"), "capsock": self.bulk_of("capsock")}
        return {
            "what": f"one stream, {self.size()} MiB, sender and receiver both reach a"
            " `capsock relay` process (three processes on two cores)",
            "unit": "MB/s",
            "higher_is_better": True,
            "values": self.interleave(peers),
            "targets": [{"subject": "capsock relay", "peer": "capsock", "op": ">=", "ratio": 0.6}],
        }

    def rpc(self) -> list[dict[str, Any]]:
        calls = 200 if self.quick else 3000
        kinds = ["msgpack/capsock", "msgpack/tcp"]
        if self.backend == "asyncio" and _version("pycapnp") != "not installed":
            kinds += ["capnp/capsock", "capnp/tcp"]
        both: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        seq: Values = {k: [] for k in kinds}
        conc: Values = {k: [] for k in kinds}
        for _ in range(self.runs):
            for kind in kinds:
                s, c = rpc.run_kind(kind, calls, self.backend)
                both[kind].append((s, c))
                seq_k, conc_k = seq[kind], conc[kind]
                assert isinstance(seq_k, list) and isinstance(conc_k, list)
                seq_k.append(s)
                conc_k.append(c)
                print(f"  rpc {kind}: {s:.0f} sequential, {c:.0f} 64-way calls/s", flush=True)
        common = {"unit": "calls/s", "higher_is_better": True, "targets": []}
        capnp_target = [{"subject": "capnp/capsock", "peer": "capnp/tcp", "op": ">=", "ratio": 0.9}]
        return [
            {
                "row": "rpc sequential",
                "what": "echo of 16 bytes, one call at a time",
                "values": seq,
                **common,
            },
            {
                "row": "rpc 64-way",
                "what": "echo of 16 bytes, 64 tasks calling at once over one connection",
                "values": conc,
                **common,
                "targets": capnp_target if "capnp/capsock" in kinds else [],
            },
        ]

    def nat(self) -> list[dict[str, Any]]:
        from . import nat_lab  # the two-NAT lab (root + ip netns, else the rows say skipped)

        return nat_lab.rows(self.runs, self.size(), self.backend)


def _last(entry: list[float] | dict[str, str]) -> str:
    if isinstance(entry, dict):
        return entry.get("error", "?")
    return f"{entry[-1]:.4g}" if entry else "-"


def _libp2p_version() -> str:
    version: Callable[[], str] | None = getattr(libp2p_peer, "version", None)
    return version() if version is not None else _version("libp2p")


def _json_run(module_args: list[str], backend: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", *module_args, "--backend", backend],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per peer (median; default 3)")
    parser.add_argument(
        "--backend",
        choices=["asyncio", "trio", "both"],
        default="asyncio",
        help="both: every row on asyncio, then on trio (each against its own TCP and TLS)",
    )
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset")
    parser.add_argument("--size", type=int, default=256, help="MiB for bulk rows (default 256)")
    parser.add_argument(
        "--libp2p-size", type=int, help="MiB for py-libp2p bulk rows (default: --size)"
    )
    parser.add_argument("--no-libp2p", action="store_true", help="skip py-libp2p")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 run (a smoke test)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="docs directory")
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    if args.libp2p_size is None:
        args.libp2p_size = args.size
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))} (known: {', '.join(ROWS)})")

    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    every = {backend: run_backend(args, rows, backend) for backend in backends}
    for results in every.values():
        print()
        print(report.render_markdown(results))
    if args.no_write:
        return
    full = not args.quick and rows == list(ROWS)
    for backend, results in every.items():
        if backend == "asyncio" and full:
            report.write_all(
                results,
                args.out / "bench" / "results.json",
                args.out / "performance.md",
                args.out / "img" / "bench.png",
            )
            print(f"wrote {args.out / 'performance.md'}, its JSON and its plot")
        else:  # a partial run does not replace the recorded section of performance.md
            out = args.out / "bench" / f"results-{backend}{'-quick' if args.quick else ''}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(f"wrote {out} (performance.md is only rewritten by a full asyncio run)")
    if full and len(every) == 2:  # the trio rows go under the asyncio ones
        md = args.out / "performance.md"
        section = report.render_markdown(every["asyncio"], png_link="img/bench.png")
        trio = report.render_markdown(every["trio"])
        report.update_markdown_file(
            md, section + "\n**The same run on the trio backend**\n\n" + trio
        )


def run_backend(args: argparse.Namespace, rows: list[str], backend: str) -> dict[str, Any]:
    """Every row of ``rows`` on one backend; ratios are to that backend's own TCP and TLS."""
    args.backend = backend
    started = time.monotonic()
    results_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, Path(tmp))
        if bench.libp2p_reason is not None:
            print(f"py-libp2p: {bench.libp2p_reason}", flush=True)
        try:
            for row in rows:
                print(f"{row} ({backend}) ...", flush=True)
                produced = getattr(bench, row)()
                for entry in produced if isinstance(produced, list) else [produced]:
                    entry.setdefault("row", row)
                    results_rows.append(entry)
        finally:
            bench.close()
    return {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "commit": _commit(),
            "python": platform.python_version(),
            "machine": f"{os.cpu_count()} cores {platform.machine()}",
            "backend": backend,
            "runs": args.runs,
            "seconds": round(time.monotonic() - started, 1),
            "versions": {
                name: _version(name) for name in ("pynacl", "anyio", "trio", "msgpack", "pycapnp")
            }
            | {"libp2p": _libp2p_version() if bench.libp2p_reason is None else "n/a"},
        },
        "rows": results_rows,
    }


if __name__ == "__main__":
    main()
