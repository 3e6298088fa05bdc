"""Entry point for ``ray job submit --working-dir . -- python jobs/reaudit.py ...``.

Joins the running cluster when Ray names one (RAY_ADDRESS, as ``ray job submit`` sets it),
otherwise starts Ray on this machine. Takes the same arguments as ``vog-ray reaudit``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vog_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["reaudit", *sys.argv[1:]]))
