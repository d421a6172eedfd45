"""The update model: update sources (``update.toml`` + editions) and update packages.

``model`` holds what a validated update source says; ``validate`` makes it from ``update.toml``
(with ``tomllines`` for error lines, ``rules`` for single values, ``cscan`` for the C files);
``package`` is the built artifact and its ``manifest.json``.
"""
