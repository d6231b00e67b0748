"""Where aptserve keeps what it builds once per user: converted models, measured constants."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "APTSERVE_CACHE_DIR"


def cache_dir() -> Path:
    """$APTSERVE_CACHE_DIR, default ~/.cache/aptserve."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "aptserve")
