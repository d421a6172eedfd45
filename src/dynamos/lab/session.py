"""Named labs that outlive one command (``lab start``/``lab stop``) and throwaway labs."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dynamos.errors import LabError
from dynamos.lab.vm import Lab, LabConfig, labs_dir


def lab_state_dir(name: str) -> Path:
    if not name or "/" in name or name.startswith((".", "run-")):
        raise LabError(f"invalid lab name {name!r}")
    return labs_dir() / name


def find_lab(name: str) -> Lab | None:
    """The running lab of that name, or None (a stale state dir is cleaned up)."""
    state_dir = lab_state_dir(name)
    if not (state_dir / "lab.json").exists():
        return None
    try:
        return Lab.attach(state_dir)
    except LabError:
        shutil.rmtree(state_dir, ignore_errors=True)
        return None


def start_lab(name: str, config: LabConfig, progress: Callable[[str], None] | None = None) -> Lab:
    """Boot a lab that stays up after this process exits."""
    if find_lab(name) is not None:
        raise LabError(f"lab {name!r} is already running (dynamos lab stop --name {name})")
    return Lab.boot(config, state_dir=lab_state_dir(name), progress=progress, detach=True)


def stop_lab(name: str) -> bool:
    """Power a named lab off; False when it was not running."""
    lab = find_lab(name)
    if lab is None:
        return False
    lab.shutdown()
    return True


def running_labs() -> list[Lab]:
    labs = []
    if labs_dir().is_dir():
        for d in sorted(labs_dir().iterdir()):
            if d.is_dir() and not d.name.startswith("run-"):
                lab = find_lab(d.name)
                if lab is not None:
                    labs.append(lab)
    return labs


@contextmanager
def lab_session(config: LabConfig, name: str | None = None,
                progress: Callable[[str], None] | None = None) -> Iterator[Lab]:
    """A lab to run commands in: the named running lab when there is one for this kernel,
    else a throwaway lab booted now and shut down on exit."""
    if name is not None:
        lab = find_lab(name)
        if lab is not None:
            if lab.kernel != config.kernel:
                raise LabError(f"lab {name!r} runs {lab.kernel}, not {config.kernel}")
            yield lab
            return
    lab = Lab.boot(config, progress=progress)
    try:
        yield lab
    finally:
        lab.kill()
        lab.discard()
