"""The documentation cannot silently fall behind the code.

Checks: every page in mkdocs.yml's nav exists; every relative link in docs/ and
README.md points at an existing file (and docs/ links stay inside docs/, as a
strict mkdocs build requires); docs/protocol.md names every frame type and
error code and its worked examples match the encoders; docs/api.md documents
every config field with its current default; the tutorial's code is the code
of the runnable examples.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from capsock import MuxConfig, NodeConfig, SessionConfig
from capsock.core.frames import (
    Accept,
    Data,
    Eof,
    Frame,
    FrameType,
    GoAway,
    Reject,
    Reset,
    Window,
    encode_frame,
)
from capsock.errors import ErrorCode
from capsock.keys import KeyPair
from capsock.uri import Label, Uses, chain_tag, mint_root

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MD_FILES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def nav_pages() -> list[str]:
    """The .md files named in mkdocs.yml's nav (a line-based parse, no YAML library)."""
    pages: list[str] = []
    in_nav = False
    for line in (ROOT / "mkdocs.yml").read_text("utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            in_nav = line.startswith("nav:")
            continue
        if in_nav:
            match = re.search(r"([\w./-]+\.md)\s*$", line)
            if match:
                pages.append(match.group(1))
    return pages


def links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text("utf-8"))
    text = INLINE_CODE.sub("", text)
    return LINK.findall(text)


def test_mkdocs_nav_pages_exist() -> None:
    pages = nav_pages()
    assert pages, "mkdocs.yml has no nav entries"
    assert "index.md" in pages
    for page in pages:
        assert (DOCS / page).is_file(), f"mkdocs.yml nav names docs/{page}, which does not exist"
    assert set(pages) == {p.name for p in MD_FILES}, "every docs/*.md page should be in the nav"


@pytest.mark.parametrize("path", [*MD_FILES, ROOT / "README.md"], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute URL, mailto:, or an anchor in the same page
        file_part = target.split("#", 1)[0]
        resolved = (path.parent / file_part).resolve()
        assert resolved.exists(), f"{path.name}: link {target!r} points at a missing file"
        if path.parent == DOCS:
            assert resolved.is_relative_to(DOCS), (
                f"{path.name}: link {target!r} leaves docs/ (mkdocs --strict rejects it); "
                "name the file in `code` instead"
            )


def protocol_text() -> str:
    return (DOCS / "protocol.md").read_text("utf-8")


@pytest.mark.parametrize("name", [t.name for t in FrameType])
def test_protocol_names_every_frame_type(name: str) -> None:
    assert re.search(rf"\b{name}\b", protocol_text()), f"docs/protocol.md does not mention {name}"


@pytest.mark.parametrize("name", [c.name for c in ErrorCode])
def test_protocol_names_every_error_code(name: str) -> None:
    assert re.search(rf"\b{name}\b", protocol_text()), f"docs/protocol.md does not mention {name}"


def test_protocol_frame_table_has_the_type_numbers() -> None:
    text = protocol_text()
    for kind in FrameType:
        assert re.search(rf"^\| {kind.value} \| `{kind.name}` \|", text, re.M), kind.name


def test_protocol_error_table_has_the_code_numbers() -> None:
    text = protocol_text()
    for code in ErrorCode:
        assert re.search(rf"^\| {code.value} \| `{code.name}` \|", text, re.M), code.name


def _spaced(frame: Frame) -> str:
    raw = encode_frame(frame).hex()
    parts = [raw[:2], raw[2:10], raw[10:14], raw[14:]]
    return " ".join(p for p in parts if p)


@pytest.mark.parametrize(
    "frame",
    [
        Data(1, b"hello"),
        Accept(1),
        Window(1, 786432),
        Window(0, 15728640),
        Eof(1),
        Reset(1, ErrorCode.CANCELLED),
        Reject(3, ErrorCode.REFUSED),
    ],
    ids=repr,
)
def test_protocol_frame_examples_match_the_encoder(frame: Frame) -> None:
    assert _spaced(frame) in protocol_text()


def test_protocol_goaway_example_matches_the_encoder() -> None:
    raw = encode_frame(GoAway(2, ErrorCode.NO_ERROR)).hex()
    assert f"{raw[:2]} {raw[2:10]} {raw[10:14]} {raw[14:22]} {raw[22:]}" in protocol_text()


def test_protocol_token_example_matches_the_code() -> None:
    text = protocol_text()
    node = KeyPair(bytes(range(32))).node_id
    root = mint_root(bytes([0xA0]) * 32, bytes.fromhex("00112233445566778899aabbccddee00"))
    tag1 = chain_tag(root.tag, Uses(1))
    tag2 = chain_tag(tag1, Label("demo"))
    attenuated = root.attenuate(Uses(1), Label("demo"))
    assert attenuated.tag == tag2
    for value in [str(node), root.tag.hex(), tag1.hex(), tag2.hex()]:
        assert value in text
    enc = attenuated.encode().hex()
    spaced = f"{enc[:2]} {enc[2:34]} {enc[34:36]} {enc[36:48]} {enc[48:60]} {enc[60:]}"
    assert spaced in text


@pytest.mark.parametrize("config", [NodeConfig, SessionConfig, MuxConfig], ids=lambda c: c.__name__)
def test_api_documents_every_config_field_and_default(config: type) -> None:
    text = (DOCS / "api.md").read_text("utf-8")
    for field in dataclasses.fields(config):
        row = re.search(rf"^\| `{field.name}` \| `([^`]*)` \|", text, re.M)
        assert row, f"docs/api.md has no row for {config.__name__}.{field.name}"
        if field.default is not dataclasses.MISSING:
            assert row.group(1) == repr(field.default), (
                f"docs/api.md says {config.__name__}.{field.name} defaults to "
                f"{row.group(1)}, the code says {field.default!r}"
            )


def test_tutorial_code_is_the_examples_code() -> None:
    examples = "".join(
        p.read_text("utf-8") for p in sorted((ROOT / "examples").glob("tutorial_*.py"))
    )
    text = (DOCS / "tutorial.md").read_text("utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert blocks
    for block in blocks:
        assert block in examples, f"tutorial block not found in examples/:\n{block}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """The documentation site builds with warnings as errors (as CI requires)."""
    import subprocess
    import sys

    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
