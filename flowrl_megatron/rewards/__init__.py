"""Reward functions by name: ``resolve_reward(name)(response_text, answer) -> float`` (1.0 correct, 0.0 wrong).

Each runs inside ``RewardPool``'s worker processes, under a per-sample time limit. A name of the form
``package.module:function`` selects a user's own function with the same signature. The built-ins are named here
and imported only when used, so that validating a config does not load sympy or the sandbox.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from math import isfinite  # not `import math`: the submodule rewards.math takes that name here once imported
from pathlib import Path

from flowrl_megatron.errors import UserError

RewardFn = Callable[[str, str], float]

# name -> (the reward "module:function", the extractor of what it grades: the final answer of a response, for
# counting distinct answers; "" when none)
REWARDS: dict[str, tuple[str, str]] = {
    "math": ("flowrl_megatron.rewards.math:math_reward", "flowrl_megatron.rewards.math:extract_answer"),
    "answer_set": ("flowrl_megatron.rewards.synthetic:answer_set_reward",
                   "flowrl_megatron.rewards.synthetic:first_line"),
    # runs the program in the sandbox (flowrl_megatron.rewards.sandbox; needs root)
    "code": ("flowrl_megatron.rewards.code:code_reward", "flowrl_megatron.rewards.code:extract_code"),
}


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def final_answer(reward: str, response: str) -> str:
    """The response's final answer as ``reward`` reads it; a user reward's answer is the whole stripped response."""
    extract = _load(REWARDS[reward][1]) if reward in REWARDS else None
    return (extract(response) if extract else response.strip()) or ""


def resolve_reward(name: str) -> RewardFn:
    return _load(REWARDS[name][0] if name in REWARDS else name)


def check_reward_name(name: str) -> None:
    """A built-in name, or ``module:function`` naming something that imports; else a UserError with the cause."""
    if name in REWARDS:
        return
    if ":" not in name:
        raise UserError(f"reward.name {name!r} is unknown; use one of {', '.join(sorted(REWARDS))} or "
                        "package.module:function.")
    module, _, attr = name.partition(":")
    try:
        loaded = importlib.import_module(module)
    except SyntaxError as e:
        raise UserError(f"reward.name {name!r}: {e.filename}:{e.lineno} has a syntax error ({e.msg}); fix the "
                        "file.") from None
    except ModuleNotFoundError as e:
        if e.name and e.name != module and not module.startswith(e.name + "."):  # a dependency, not the module
            raise UserError(f"reward.name {name!r}: importing {module} failed: no module named {e.name!r}; install "
                            "it where the trainer runs.") from None
        raise UserError(f"reward.name {name!r}: no module named {module!r}; make it importable (on PYTHONPATH or "
                        "installed) or use a built-in reward.") from None
    except Exception as e:  # the module's own code failed: say where
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise UserError(f"reward.name {name!r}: importing {module} raised {type(e).__name__}: {e} "
                        f"({Path(frame.filename).name}:{frame.lineno}).") from None
    if not hasattr(loaded, attr):
        raise UserError(f"reward.name {name!r}: module {module} has no {attr!r}.")


def check_reward_call(name: str, answer: str) -> None:
    """Call a user's reward once, as the workers will, on an empty response and a real answer: it must take
    (response, answer) and return a finite number. Built-ins are not called (the code reward needs the sandbox)."""
    if name in REWARDS:
        return
    fn = resolve_reward(name)
    if not callable(fn):
        raise UserError(f"reward.name {name!r} is a {type(fn).__name__}, not a function; it must be "
                        "function(response, answer) -> number.")
    try:
        value = fn("", answer)
    except TypeError as e:
        raise UserError(f"reward.name {name!r} cannot be called as function(response, answer): {e}.") from None
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise UserError(f"reward.name {name!r} raised {type(e).__name__}: {e} when called on an empty response "
                        f"({Path(frame.filename).name}:{frame.lineno}); a reward must score any text.") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not isfinite(value):
        raise UserError(f"reward.name {name!r} returned {value!r:.60} for an empty response; it must return a "
                        "finite number.")
