"""Help, man page and shell completion, all made from the one argument parser, so none of them
can drift from what the commands accept.

``dynamos docs man`` prints the man page (roff), ``dynamos docs bash-completion`` the bash
completion script (the Debian package installs both).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from dynamos import __version__

# One example per command, shown by --help and in the man page.
EXAMPLES: dict[str, str] = {
    "build": "dynamos build examples/cmdline-banner --kernel 6.1.0-56-amd64 -o out/ --signer keys/",
    "signer new": 'dynamos signer new keys/ --name "Example Corp fixes"',
    "apply": "dynamos apply out/cmdline-banner_6.1.0-56-amd64.dynpkg --timeout 30",
    "blockers": "dynamos blockers cmdline-banner",
    "revert": "dynamos revert cmdline-banner",
    "recover": "dynamos recover --json",
    "status": "dynamos status --uname",
    "list": "dynamos list --json",
    "info": "dynamos info out/cmdline-banner_6.1.0-56-amd64.dynpkg",
    "switch": "dynamos switch cmdline-editions cmdline_proc_show 2 --share 10",
    "retire": "dynamos retire cmdline-editions cmdline_proc_show 1 --timeout 10",
    "monitor": "dynamos monitor pipe_write && dynamos monitor --show",
    "demo": "dynamos demo",
    "docs": "dynamos docs man > dynamos.8; dynamos docs bash-completion > /etc/bash_completion.d/dynamos",
    "install": "dynamos install out/cmdline-banner_6.1.0-56-amd64.dynpkg",
    "uninstall": "dynamos uninstall cmdline-banner",
    "load": "dynamos load --all",
    "gc": "dynamos gc --json",
    "installed": "dynamos installed",
    "lab start": "dynamos lab start --name lab1",
    "lab stop": "dynamos lab stop --name lab1",
    "lab status": "dynamos lab status --json",
    "lab run": "dynamos lab run -- uname -r",
    "lab shell": "dynamos lab shell",
}

EXIT_STATUSES = (
    (0, "success"), (1, "generic error"), (2, "invalid update source (file and line given)"),
    (3, "invalid, tampered or untrusted package"), (4, "build failed"),
    (5, "refused before touching the kernel (or no such update)"),
    (6, "transition did not finish: reverted"), (7, "target kernel could not be fetched or prepared"),
    (8, "lab failure"), (9, "load --all: an installed update is not live (the others are)"),
    (64, "usage error"), (130, "interrupted"),
)


def exit_status_text() -> str:
    return "exit statuses:\n" + "\n".join(f"  {n:<4} {what}" for n, what in EXIT_STATUSES)


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser, by its name ("lab run"), subcommands included, leaves only; each
    gets its one-line help as its description, for --help and the man page."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, sub in action.choices.items():
                sub.description = sub.description or helps.get(name)
                full = f"{prefix} {name}".strip()
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from commands(sub, full)
                else:
                    yield full, sub


def finish(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every command -q/-v, its example and the exit statuses in --help."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = exit_status_text()
    for name, sub in commands(parser):
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        example = EXAMPLES.get(name)
        sub.epilog = (f"example:\n  {example}\n\n" if example else "") + exit_status_text()
        if "-q" not in sub._option_string_actions:
            sub.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
        sub.add_argument("-v", "--verbose", action="store_true",
                         help="more detail: with an error, also the chain of causes behind it")
    return parser


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for a in parser._actions for o in a.option_strings)


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script: command names, then each command's options (and files)."""
    cases = []
    for name, sub in commands(parser):
        cases.append(f'        "{name}") opts="{" ".join(_options(sub))}" ;;')
    top = sorted({name.split()[0] for name, _ in commands(parser)})
    nested = {}
    for name, _ in commands(parser):
        if " " in name:
            nested.setdefault(name.split()[0], []).append(name.split()[1])
    nested_cases = "\n".join(f'        {k}) words="{" ".join(v)}" ;;' for k, v in sorted(nested.items()))
    return f"""# bash completion for dynamos {__version__} (generated from its argument parser)
_dynamos() {{
    local cur cmd opts words
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{" ".join(top)} --version --help" -- "$cur")); return
    fi
    cmd="${{COMP_WORDS[1]}}"
    if [ "$COMP_CWORD" -eq 2 ]; then
        case "$cmd" in
{nested_cases}
        *) words="" ;;
        esac
        if [ -n "$words" ]; then COMPREPLY=($(compgen -W "$words" -- "$cur")); return; fi
    fi
    case "$cmd" in {" | ".join(sorted(nested))}) cmd="$cmd ${{COMP_WORDS[2]}}" ;; esac
    case "$cmd" in
{chr(10).join(cases)}
        *) opts="" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F _dynamos dynamos
"""


def _roff(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("'", "\\(aq")


def man_page(parser: argparse.ArgumentParser) -> str:
    """dynamos(8) in roff: synopsis, every command with its options and example, exit statuses."""
    out = [f'.TH DYNAMOS 8 "" "dynamos {__version__}" "System Administration"', ".SH NAME",
           "dynamos \\- live updates of a running Linux kernel", ".SH SYNOPSIS",
           ".B dynamos\n.I command\n[\\fIoptions\\fR]", ".SH DESCRIPTION", _roff(parser.description or ""),
           ".SH COMMANDS"]
    for name, sub in commands(parser):
        out.append(f".SS {_roff(name)}")
        if sub.description:
            out.append(_roff(sub.description))
        out.append(".PP\n" + _roff(" ".join(sub.format_usage().replace("usage: ", "").split())))
        for action in sub._actions:
            if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
                continue
            label = ", ".join(action.option_strings) or action.dest
            out.append(f".TP\n.B {_roff(label)}\n{_roff(action.help or '')}")
        if name in EXAMPLES:
            out.append(f".PP\nExample:\n.nf\n{_roff(EXAMPLES[name])}\n.fi")
    out.append(".SH EXIT STATUS")
    for n, what in EXIT_STATUSES:
        out.append(f".TP\n.B {n}\n{_roff(what)}")
    out.append(".SH SEE ALSO\nThe README of the dynamos source tree.")
    return "\n".join(out) + "\n"
