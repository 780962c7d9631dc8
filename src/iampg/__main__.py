"""``python -m iampg``: the ``iampg`` command."""

import sys

from iampg.cli import main

sys.exit(main())
