"""The build layer: from an update source to a livepatch module for a target kernel.

``cgen`` writes the livepatch glue (C and Kbuild) as plain text; ``kbuild`` runs the target's
Kbuild tree over the glue and the author's editions and checks the module it produces.
"""

from dynamos.builder.cgen import generate_kbuild, generate_livepatch_source
from dynamos.builder.kbuild import BuildResult, build_update, read_modinfo

__all__ = [
    "BuildResult",
    "build_update",
    "generate_kbuild",
    "generate_livepatch_source",
    "read_modinfo",
]
