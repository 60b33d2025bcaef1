"""Where cl3 keeps things between runs: a cache (KLD base logits, downloads, hardware verdicts) and user data (chats)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "CL3_CACHE_DIR"
DATA_DIR_ENV = "CL3_DATA_DIR"


def cache_dir() -> Path:
    """$CL3_CACHE_DIR, or the platform's user cache directory."""
    if env := os.environ.get(CACHE_DIR_ENV):
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("cl3"))


def data_dir() -> Path:
    """$CL3_DATA_DIR, or the platform's user data directory."""
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("cl3", appauthor=False))
