from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.test_cli import Cli


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """A ``capsock`` CLI runner with its own state directories (tests/test_cli.py)."""
    from tests.test_cli import Cli

    runner = Cli(tmp_path)
    try:
        yield runner
    finally:
        runner.cleanup()
