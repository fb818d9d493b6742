"""Command-line tools; shared modules import as ``tools.<folder>.<module>`` (repository root)."""
