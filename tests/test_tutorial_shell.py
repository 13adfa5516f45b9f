"""The tutorial's shell walk-through, run exactly as written in docs/tutorial.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_tutorial_shell_block_runs(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "tutorial.md").read_text()
    match = re.search(r"<!-- tutorial-shell -->\n```bash\n(.*?)```", text, re.S)
    assert match, "docs/tutorial.md lost its tested shell block"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    result = subprocess.run(
        ["bash", "-c", match.group(1)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hello over a capability" in result.stdout
    assert "file arrived intact" in result.stdout
    assert "caveats" in result.stdout
    token = (tmp_path / "send.uri").read_text().split("/")[3].split("?")[0]
    assert token not in result.stdout  # inspect never shows the secret
