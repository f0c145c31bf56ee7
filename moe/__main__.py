"""`python -m moe` = the `moe` console script (moe.apps.cli.main)."""

from moe.apps.cli import main

raise SystemExit(main())
