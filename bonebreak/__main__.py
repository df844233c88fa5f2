"""``python -m bonebreak <command>``: the same as the ``bonebreak`` console command."""

import sys

from .commands import main

sys.exit(main())
