"""``python -m fswatch_sync`` is the ``fswatch-sync`` command."""

import sys

from fswatch_sync.cli import main

sys.exit(main())
