"""``python -m qlora`` runs the qlora command (torchrun uses this form).

A rank of a multi-process run leaves without the interpreter's teardown, once its
work is saved and its output flushed: at exit, a thread that c10d left behind is
sometimes destroyed while still joinable, and the rank dies of SIGABRT ("terminate
called without an active exception") after a complete run, which the launcher then
reports as the run's failure (seen about once in 20 two-rank runs on a busy CPU).
"""

import logging
import os
import sys

from qlora.cli.main import main

status = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
raise SystemExit(status)
