"""The builder: from an update source or a source diff to a livepatch module for a target kernel.

``cgen`` writes the livepatch glue (C and Kbuild) as plain text; ``kbuild`` runs the target's
Kbuild tree over the glue and the author's editions; ``patch`` is the source-diff front end, on
the object layer in ``elf/`` (``objdiff``, ``extract``, ``klp``, ``fidelity``).
"""
