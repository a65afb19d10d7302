"""``python -m sepify``: the same as the ``sepify`` command."""

import sys

from .cli import main

sys.exit(main())
