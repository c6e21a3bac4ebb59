"""``python -m dirtylog``: the same as the ``dirtylog`` command."""

import sys

from dirtylog.cli import main

sys.exit(main())
