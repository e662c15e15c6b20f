"""``python -m normalizer``: run the normalizer until SIGINT/SIGTERM."""

from normalizer.app import SERVICE
from servicekit.runtime import main

raise SystemExit(main(SERVICE))
