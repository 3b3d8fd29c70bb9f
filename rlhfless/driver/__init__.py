"""The driver: one synchronous RL step at a time against the runtime interface.

`loop` (the step), `planner` (scheduling state), `rollout`, `learn`, `records`, `metrics`
(a step's record), `prewarm` (starting and releasing stages around phases), `plots`.
"""

from rlhfless.driver.loop import Driver

__all__ = ["Driver"]
