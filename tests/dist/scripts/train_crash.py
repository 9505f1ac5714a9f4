"""`widemoe train` under torchrun where rank 1 fails at step 2 (an injected error): every rank must end,
with the error named, instead of rank 0 waiting forever in its next collective."""

from __future__ import annotations

import os
import sys

from widemoe.cli import main
from widemoe.train.loop import Trainer

_step = Trainer.train_step


def failing_step(self):  # noqa: ANN001, ANN202
    if os.environ.get("RANK") == "1" and self.step == 1:
        raise RuntimeError("injected failure on rank 1 at step 2")
    return _step(self)


Trainer.train_step = failing_step
raise SystemExit(main(sys.argv[1:]))
