"""The update model: update sources (``update.toml`` + editions) and update packages."""
