"""``python -m pop3d`` is the ``pop3d`` console script."""

from __future__ import annotations

import sys

from pop3d.cli import main

sys.exit(main())
