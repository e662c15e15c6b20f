"""``python -m resolver``: run the resolver service until SIGINT/SIGTERM."""

from resolver.app import SERVICE
from servicekit.runtime import main

raise SystemExit(main(SERVICE))
