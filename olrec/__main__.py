"""``python -m olrec``: the same as the ``olrec`` command."""

import sys

from .cli import main

sys.exit(main())
