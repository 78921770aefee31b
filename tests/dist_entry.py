"""torchrun entry point used by tests.distributed: python -m tests.dist_entry MODULE:FUNC KWARGS_JSON RESULT_DIR"""

import importlib
import json
import os
import sys
import traceback
from pathlib import Path


def main() -> None:
    target, kwargs_json, result_dir = sys.argv[1:4]
    rank = int(os.environ.get("RANK", 0))
    module, func = target.split(":")
    try:
        result = getattr(importlib.import_module(module), func)(**json.loads(kwargs_json))
    except BaseException:
        (Path(result_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    (Path(result_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    from flowrl_megatron.runtime import shutdown

    shutdown()


# dist_checkpointing and vLLM start processes with spawn, which re-imports __main__: keep the guard.
if __name__ == "__main__":
    main()
