"""``python -m realtime``: the same as the ``realtime`` command."""

import sys

from realtime.cli import main

sys.exit(main())
