"""`python -m moe` = the `moe` console script (moe.cli.main)."""

from moe.cli import main

raise SystemExit(main())
