"""``python -m agent``: the same as the ``edge-agent`` command."""

import sys

from agent.edge.cli import main

sys.exit(main())
