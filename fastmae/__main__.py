"""``python -m fastmae bench|validate``: the same as the ``fastmae`` command."""

from fastmae.cli import main

raise SystemExit(main())
