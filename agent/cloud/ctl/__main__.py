"""``python -m agent.cloud.ctl``: the same ``edgectl`` as the console script.

Must never: hold logic of its own.
"""

from __future__ import annotations

import sys

from agent.cloud.ctl import main

sys.exit(main())
