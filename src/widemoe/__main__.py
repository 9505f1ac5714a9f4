"""`python -m widemoe ...` (and `torchrun ... -m widemoe train ...`): the same CLI as the `widemoe` script."""

from widemoe.cli import main

raise SystemExit(main())
