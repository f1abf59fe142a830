"""fswatch_sync: keep a web app's database in step with a directory tree, in real time."""

from fswatch_sync.layout import AppKey
from fswatch_sync.settings import Settings, load_settings

__all__ = ["AppKey", "Settings", "load_settings"]
__version__ = "0.1.0"
