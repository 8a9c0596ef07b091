"""``python -m qlora`` runs the qlora command (torchrun uses this form)."""

from qlora.cli.main import main

raise SystemExit(main())
