"""``python -m outlierkit`` runs the CLI."""

from outlierkit.cli import main

raise SystemExit(main())
