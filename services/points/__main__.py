"""``python -m points``: run the points service until SIGINT/SIGTERM."""

from points.app import SERVICE
from servicekit.runtime import main

raise SystemExit(main(SERVICE))
