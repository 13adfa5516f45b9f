"""Shared pieces of the atheris harnesses: a data provider, seeds, the runner.

The harnesses do not need atheris to be imported: ``TestOneInput`` only uses
:class:`Provider`, so ``python fuzz/fuzz_uri.py --selftest`` (and the test
suite) can run them on the seeds and on random input without it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

GOLDEN = ROOT / "tests" / "data" / "uris.json"


class Provider:
    """Consumes a fuzz input from the front (like atheris.FuzzedDataProvider)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + max(n, 0)]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(self.remaining())

    def int(self, low: int, high: int) -> int:
        """An int in [low, high] from as few bytes as the range needs (low if empty)."""
        span = high - low
        if span <= 0:
            return low
        size = (span.bit_length() + 7) // 8
        raw = self.take(size)
        return low + int.from_bytes(raw, "big") % (span + 1) if raw else low

    def bool(self) -> bool:
        return bool(self.int(0, 1))

    def pick(self, options: list[object]) -> object:
        return options[self.int(0, len(options) - 1)]


def golden() -> dict[str, list[dict[str, str]]]:
    if GOLDEN.exists():
        return dict(json.loads(GOLDEN.read_text()))
    return {"valid": [], "invalid": [], "invalid_tokens": []}


def main(test_one_input: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    """Run under atheris, starting from the seeds when no corpus (or an empty one) is given.

    ``--selftest`` runs the seeds and 2,000 random inputs without atheris.
    """
    args = sys.argv[1:]
    if "--selftest" in args:
        import random

        rng = random.Random(0)
        inputs = list(seeds) + [rng.randbytes(rng.randint(0, 300)) for _ in range(2000)]
        for data in inputs:
            test_one_input(data)
        print(f"selftest: {len(inputs)} inputs, invariant held")
        return
    import atheris

    atheris.instrument_all()
    dirs = [Path(a) for a in args if not a.startswith("-") and Path(a).is_dir()]
    if not [a for a in args if not a.startswith("-")]:
        corpus = Path(tempfile.mkdtemp(prefix="capsock-corpus-"))
        sys.argv.append(str(corpus))
        print(f"seed corpus: {corpus}", file=sys.stderr)
        dirs = [corpus]
    if dirs and not any(dirs[0].iterdir()):
        # An empty corpus directory (a first run) starts from the seeds too.
        for i, seed in enumerate(seeds):
            Path(dirs[0], f"seed-{i:04d}").write_bytes(seed)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
