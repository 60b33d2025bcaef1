"""`cl3 chat`'s terminal user interface (Textual)."""

from .app import ChatApp

__all__ = ["ChatApp"]
