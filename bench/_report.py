"""Printing a bench script's results: JSON for scripts, aligned ``name value`` lines for people."""

from __future__ import annotations

import json
from collections.abc import Mapping


def print_results(results: Mapping[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for k, v in results.items():
            print(f"{k:<24} {v}")
