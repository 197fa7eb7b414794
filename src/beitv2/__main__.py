"""``python -m beitv2``: the same as the ``beitv2`` command."""

from .cli import main

raise SystemExit(main())
