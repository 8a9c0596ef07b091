"""``python -m qlora`` runs the qlora command (torchrun uses this form).

A rank of a multi-process run leaves without the interpreter's teardown, once its
work is saved and its output flushed: at exit, a thread that c10d left behind is
sometimes destroyed while still joinable, and the rank dies of SIGABRT ("terminate
called without an active exception") after a complete run, which the launcher then
reports as the run's failure (seen about once in 20 two-rank runs on a busy CPU); ``qlora train`` ends its ranks
so even before its model is freed (:func:`qlora.cli.launch.end_rank`). A rank also follows its launcher
(:func:`qlora.cli.launch.follow_launcher`): when that dies, the rank stops with a checkpoint.
"""

import os

from qlora.cli.launch import end_rank, follow_launcher
from qlora.cli.main import main

rank_of_many = int(os.environ.get("WORLD_SIZE", "1")) > 1
if rank_of_many:
    follow_launcher()
status = main()
if rank_of_many:
    end_rank(status)
raise SystemExit(status)
