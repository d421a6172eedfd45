"""Argument types: a user's mistake is a usage error naming the argument, not a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dynamos.errors import DynamosError


def _library_type(parse: Callable[[str], object], name: str) -> Callable[[str], object]:
    """An argparse type from a library parser: its refusal becomes argparse's usage error."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except DynamosError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def name_arg(what: str) -> Callable[[str], object]:
    """A name that becomes a path component (update, function, edition, lab): the one safe set."""
    from dynamos.update.names import checked_name

    return _library_type(lambda text: checked_name(text, what, "the command line"), what)


def _number(text: str, *, integer: bool, minimum: float) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if integer else 'a number'}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of at least {minimum:g}")
    return value


def seconds_arg(text: str) -> float:
    return _number(text, integer=False, minimum=0)


def regex_arg(text: str) -> str:
    """A regular expression, refused at parse time when it does not compile."""
    import re

    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({e})") from None
    return text


def count_arg(text: str) -> int:
    return int(_number(text, integer=True, minimum=1))


def pids_arg(text: str) -> object:
    from dynamos.kernel.editions import parse_pids

    return _library_type(parse_pids, "pids")(text)


def cpus_arg(text: str) -> object:
    from dynamos.kernel.editions import parse_cpus

    return _library_type(parse_cpus, "cpus")(text)


def share_arg(text: str) -> object:
    from dynamos.kernel.editions import parse_share

    return _library_type(parse_share, "share")(text)


def add_wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=seconds_arg, default=None, metavar="S",
                   help="wait up to S seconds for another dynamos changing this kernel (default: refuse at once)")


def add_trust_store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-store", metavar="DIR", help="directory of trusted signers' keyrings "
                   "(default: $DYNAMOS_TRUST_STORE, else /etc/dynamos/trusted)")
