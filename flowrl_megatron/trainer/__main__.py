"""A trainer rank: ``python -m flowrl_megatron.trainer RUN_DIR/config.yaml``, as torchrun starts it.

The entry point is a package's ``__main__`` because multiprocessing's spawn re-runs any other main module in every
child: each reward worker and the checkpoint writer's manager would import the whole trainer again (about 12 s of
CPU each on these machines) only to score strings or pass results.
"""

from flowrl_megatron.trainer.loop import main

main()
