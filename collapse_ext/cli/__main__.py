"""``python -m collapse_ext.cli <command>``."""

import sys

from . import main

sys.exit(main())
