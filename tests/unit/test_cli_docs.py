"""--help, the man page and bash completion, all made from the one parser: checked for every
command, so a new command or option cannot miss them."""

from __future__ import annotations

import subprocess

import pytest

from dynamos import cli
from dynamos.cli.docs import EXAMPLES, bash_completion, commands, man_page

PARSER = cli.build_parser()
COMMANDS = [name for name, _ in commands(PARSER)]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_an_example_the_exit_statuses_and_q_v(name: str) -> None:
    sub = dict(commands(PARSER))[name]
    text = sub.format_help()
    assert name in EXAMPLES and f"example:\n  {EXAMPLES[name]}" in text
    assert "exit statuses:" in text and "64   usage error" in text
    assert "-q, --quiet" in text and "-v, --verbose" in text
    assert EXAMPLES[name].startswith(f"dynamos {name}")


def test_man_page_names_every_command_and_option() -> None:
    page = man_page(PARSER)
    assert page.startswith(".TH DYNAMOS 8")
    for name, sub in commands(PARSER):
        assert f".SS {name}" in page
        for action in sub._actions:
            for option in action.option_strings:
                if option in ("-h", "--help"):
                    continue
                assert option.replace("-", "\\-") in page, (name, option)


def complete(*words: str) -> list[str]:
    script = bash_completion(PARSER) + f"""
COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}; _dynamos; printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()


def test_bash_completion_completes_commands_subcommands_and_options() -> None:
    assert complete("dynamos", "ap") == ["apply"]
    assert complete("dynamos", "lab", "r") == ["run"]
    assert complete("dynamos", "apply", "--allow-") == ["--allow-older", "--allow-unsigned"]
    assert "--share" in complete("dynamos", "switch", "--")
    assert "--cpus" in complete("dynamos", "lab", "run", "--c")
