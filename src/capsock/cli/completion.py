"""``capsock completion bash|zsh|fish``: completion scripts generated from the parser,
so they never fall behind the options."""

from __future__ import annotations

import argparse

__all__ = ["bash_script", "fish_script", "zsh_script"]

_PATH_OPTIONS = {"--state-dir": "dir", "-o": "file", "--output": "file", "--uri-file": "file"}
_PATH_POSITIONALS = {"PATH"}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings]


def bash_script(
    top: argparse.ArgumentParser, commands: dict[str, tuple[argparse.ArgumentParser, str]]
) -> str:
    """A bash completion function for ``capsock``."""
    top_words = " ".join([*commands, *(o for a in _options(top) for o in a.option_strings)])
    cases = []
    for name, (sub, _) in commands.items():
        words = " ".join(o for a in _options(sub) for o in a.option_strings)
        choices = [c for a in _positionals(sub) if a.choices for c in a.choices]
        if choices:
            cases.append(f'        {name}) opts="{words}"; words="{" ".join(choices)}" ;;')
        else:
            cases.append(f'        {name}) opts="{words}" ;;')
    dirs = "|".join(o for o, kind in _PATH_OPTIONS.items() if kind == "dir")
    files = "|".join(o for o, kind in _PATH_OPTIONS.items() if kind == "file")
    body = "\n".join(cases)
    return f"""\
# bash completion for capsock.  Load it with:  source <(capsock completion bash)
_capsock() {{
    local cur prev cmd opts words i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    if [[ -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W "{top_words}" -- "$cur"))
        return 0
    fi
    case "$prev" in
        {dirs}) COMPREPLY=($(compgen -d -- "$cur")); return 0 ;;
        {files}) COMPREPLY=($(compgen -f -- "$cur")); return 0 ;;
    esac
    opts=""
    words=""
    case "$cmd" in
{body}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [[ -n "$words" ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
    return 0
}}
complete -o filenames -F _capsock capsock
"""


def _zsh_text(text: str | None) -> str:
    short = (text or "").split(";", 1)[0].strip()
    short = short.replace("\\", "\\\\").replace("'", "'\\''")
    for ch in "[]:":
        short = short.replace(ch, "\\" + ch)
    return short


def _zsh_spec(action: argparse.Action) -> list[str]:
    desc = _zsh_text(action.help)
    takes_value = action.nargs != 0
    value = ""
    if takes_value:
        kind = _PATH_OPTIONS.get(action.option_strings[-1])
        label = action.metavar if isinstance(action.metavar, str) else "value"
        action_text = "_files -/" if kind == "dir" else "_files" if kind == "file" else "_message"
        if action_text == "_message":
            action_text = f"_message {label}"
        value = f":{label}:{action_text}"
    repeat = "*" if isinstance(action, argparse._AppendAction | argparse._CountAction) else ""
    return [f"'{repeat}{opt}[{desc}]{value}'" for opt in action.option_strings]


def zsh_script(
    top: argparse.ArgumentParser, commands: dict[str, tuple[argparse.ArgumentParser, str]]
) -> str:
    """A zsh completion function for ``capsock``."""
    described = "\n".join(
        f"    '{name}:{_zsh_text(help_)}'" for name, (_, help_) in commands.items()
    )
    top_specs = " \\\n    ".join(s for a in _options(top) for s in _zsh_spec(a))
    cases = []
    for name, (sub, _) in commands.items():
        specs = [s for a in _options(sub) for s in _zsh_spec(a)]
        for i, pos in enumerate(_positionals(sub), start=1):
            label = (pos.metavar if isinstance(pos.metavar, str) else pos.dest).lower()
            if pos.choices:
                what = "(" + " ".join(str(c) for c in pos.choices) + ")"
            elif pos.metavar in _PATH_POSITIONALS:
                what = "_files"
            else:  # not " ": that action keeps zsh from completing the options
                what = f"_message {label}"
            specs.append(f"'{i}:{label}:{what}'")
        joined = " \\\n                ".join(specs) if specs else "'*: :'"
        cases.append(f"            {name}) _arguments {joined} ;;")
    body = "\n".join(cases)
    return f"""\
#compdef capsock
# zsh completion for capsock.  Load it with:  source <(capsock completion zsh)
# (after compinit), or save it as _capsock in a directory of your $fpath.
_capsock() {{
  local curcontext="$curcontext" state line
  local -a commands
  commands=(
{described}
  )
  _arguments -C \\
    {top_specs} \\
    '1: :->command' \\
    '*:: :->args'
  case $state in
    command)
      _describe -t commands 'capsock command' commands ;;
    args)
      case $line[1] in
{body}
      esac ;;
  esac
}}
if [[ "$funcstack[1]" = "_capsock" ]]; then
  _capsock "$@"
else
  compdef _capsock capsock
fi
"""


def _fish_text(text: str | None) -> str:
    short = (text or "").split(";", 1)[0].strip()
    return "'" + short.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_option(condition: str, action: argparse.Action) -> str:
    parts = ["complete -c capsock", f"-n {condition}"]
    for opt in action.option_strings:
        parts.append(f"-s {opt[1:]}" if len(opt) == 2 else f"-l {opt[2:]}")
    if action.nargs != 0:
        kind = _PATH_OPTIONS.get(action.option_strings[-1])
        if kind == "dir":
            parts.append("-r -f -a '(__fish_complete_directories)'")
        elif kind == "file":
            parts.append("-r -F")
        elif action.choices:
            parts.append("-x -a " + _fish_text(" ".join(str(c) for c in action.choices)))
        else:
            parts.append("-x")
    parts.append(f"-d {_fish_text(action.help)}")
    return " ".join(parts)


def fish_script(
    top: argparse.ArgumentParser, commands: dict[str, tuple[argparse.ArgumentParser, str]]
) -> str:
    """A fish completion script for ``capsock``."""
    names = " ".join(commands)
    lines = [
        "# fish completion for capsock.  Load it with:  capsock completion fish | source",
        "# or save it as ~/.config/fish/completions/capsock.fish",
        "complete -c capsock -f",
    ]
    first = f"'not __fish_seen_subcommand_from {names}'"
    lines += [_fish_option(first, a) for a in _options(top)]
    for name, (_, help_) in commands.items():
        lines.append(f"complete -c capsock -n {first} -a {name} -d {_fish_text(help_)}")
    for name, (sub, _) in commands.items():
        cond = f"'__fish_seen_subcommand_from {name}'"
        lines += [_fish_option(cond, a) for a in _options(sub)]
        for pos in _positionals(sub):
            if pos.choices:
                words = " ".join(str(c) for c in pos.choices)
                lines.append(f"complete -c capsock -n {cond} -a {_fish_text(words)}")
            elif pos.metavar in _PATH_POSITIONALS:
                lines.append(f"complete -c capsock -n {cond} -F")
    return "\n".join(lines) + "\n"
