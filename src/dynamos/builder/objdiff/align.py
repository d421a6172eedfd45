"""Tie the patched object's file-local variables to the original's when their keys differ.

A data key drops gcc's number (``count.1`` -> ``count``) only while the base name is unique in the
file; a patch that adds a second ``static int count`` elsewhere turns the first into
``counter/count``, and removing one turns ``counter/count`` back into ``count``. Without this step
the old variable would look new to the diff, and the update would carry a fresh copy of a
variable that has state in the running kernel. Variables of one base name are paired 1:1 when
each side has one left, else by the functions that use them (one pairing each way, or none).
"""

from __future__ import annotations

from dataclasses import replace

from dynamos.builder.objdiff.normalise import DataItem, ObjectInfo, Reloc, _unnumbered


def align_statics(original: ObjectInfo, patched: ObjectInfo) -> ObjectInfo:
    """``patched`` with the keys of its file-local data renamed to the original's where they
    are the same variable under another key (see module docstring); unchanged otherwise."""
    renames: dict[str, str] = {}
    users_o, users_p = _users(original), _users(patched)
    for base, left_o in _unpaired(original, patched).items():
        left_p = _unpaired(patched, original).get(base, [])
        if not left_p:
            continue
        if len(left_o) == 1 and len(left_p) == 1:
            renames[left_p[0].name] = left_o[0].name
            continue
        for p in left_p:
            near = [o for o in left_o if users_o.get(o.name, set()) & users_p.get(p.name, set())]
            back = [q for q in left_p if near and users_p.get(q.name, set()) & users_o.get(near[0].name, set())]
            if len(near) == 1 and back == [p]:
                renames[p.name] = near[0].name
    return _renamed(patched, renames) if renames else patched


def _unpaired(info: ObjectInfo, other: ObjectInfo) -> dict[str, list[DataItem]]:
    """File-local data of ``info`` whose key ``other`` does not have, by base name."""
    out: dict[str, list[DataItem]] = {}
    for key, item in info.data.items():
        if item.binding == "local" and key not in other.data:
            out.setdefault(_unnumbered(item.symbol), []).append(item)
    return out


def _users(info: ObjectInfo) -> dict[str, set[str]]:
    """Data key -> the functions (parents of .cold parts) that reference it."""
    users: dict[str, set[str]] = {}
    for fn in info.functions.values():
        for r in fn.relocs:
            if r.symbol in info.data:
                users.setdefault(r.symbol, set()).add(fn.parent or fn.name)
    return users


def _renamed(info: ObjectInfo, renames: dict[str, str]) -> ObjectInfo:
    def relocs(rows: tuple[Reloc, ...]) -> tuple[Reloc, ...]:
        return tuple(replace(r, symbol=renames[r.symbol]) if r.symbol in renames else r for r in rows)

    return replace(
        info,
        functions={name: replace(fn, relocs=relocs(fn.relocs)) for name, fn in info.functions.items()},
        data={renames.get(key, key): replace(item, name=renames.get(key, key), relocs=relocs(item.relocs))
              for key, item in info.data.items()},
        tables={name: tuple(replace(e, relocs=relocs(e.relocs)) for e in entries)
                for name, entries in info.tables.items()},
        opaque={name: tuple((size, blob, relocs(rows)) for size, blob, rows in parts)  # type: ignore[misc]
                for name, parts in info.opaque.items()},
    )
