"""Allows ``python -m bridge``, the same as the ``jmix-bridge`` command."""

import sys

from bridge.cli import main

sys.exit(main())
