"""The process-wide setting a command makes before it compiles (the library never makes it itself)."""

from __future__ import annotations


def enable_compile_cache() -> None:
    """Keep compiled programs on disk (``$JAXREG_CACHE_DIR``, empty for none, else
    ``~/.cache/jaxreg/xla``), so the next command loads them instead of compiling again. Every
    command that compiles calls this once its arguments have been checked."""
    import jaxreg

    jaxreg.configure()
