"""``capsock help [TOPIC]``: the CLI reference (docs/cli.md), shipped inside the package.

``capsock/cli/reference.md`` is docs/cli.md itself (a link in the source
tree, a copy in a built wheel), so an installed ``capsock`` can show its
reference without the source checkout or a network.
"""

from __future__ import annotations

import re
from importlib import resources

from .common import CliError, Exit

__all__ = ["cmd_help", "reference_text", "topics"]

_COMMAND = re.compile(r"`capsock ([a-z]+)`")


def reference_text() -> str:
    """The whole CLI reference (Markdown)."""
    return resources.files(__package__).joinpath("reference.md").read_text("utf-8")


def _slug(heading: str) -> str:
    text = re.sub(r"`[^`]*`|\([^)]*\)", "", heading).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w]
    if words[:1] == ["the"]:
        words = words[1:]
    return "-".join(words)


def topics(text: str | None = None) -> dict[str, str]:
    """Topic name -> its section of the reference (heading included).

    Every ``##``/``###`` heading is a topic (``exit-codes``,
    ``identity-and-state``, ...); a section about commands (``### `capsock
    share` and `capsock forward```) is also found under each command's name."""
    lines = (text if text is not None else reference_text()).splitlines()
    headings: list[tuple[int, int, str]] = []  # (line, level, heading)
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{2,3}) (.+)", line)):
            headings.append((i, len(match.group(1)), match.group(2)))
    found: dict[str, str] = {}
    for n, (start, level, heading) in enumerate(headings):
        end = next((i for i, lv, _ in headings[n + 1 :] if lv <= level), len(lines))
        section = "\n".join(lines[start:end]).strip() + "\n"
        names = _COMMAND.findall(heading) if level == 3 else []
        for name in names or [_slug(heading)]:
            found.setdefault(name, section)
    return found


def cmd_help(topic: str | None) -> int:
    """Print the reference's section on ``topic`` (all of it for ``all``), or the topics."""
    text = reference_text()
    if topic == "all":
        print(text, end="", flush=True)
        return Exit.OK
    sections = topics(text)
    if topic is None:
        lines = ["capsock help TOPIC shows one part of the CLI reference; topics:", ""]
        lines += [f"  {name}" for name in sections]
        lines += ["", "capsock help all prints the whole reference (Markdown)."]
        print("\n".join(lines), flush=True)
        return Exit.OK
    key = topic.lower()
    matches = [name for name in sections if name == key] or [
        name for name in sections if name.startswith(key)
    ]
    if len(matches) != 1:
        raise CliError(
            f"no help topic {topic!r}"
            + (f" (it could be: {', '.join(matches)})" if matches else "")
            + "; `capsock help` lists the topics",
            Exit.USAGE,
        )
    print(sections[matches[0]], end="", flush=True)
    return Exit.OK
