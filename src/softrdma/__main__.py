"""``python -m softrdma``."""

from softrdma.cli import main

raise SystemExit(main())
