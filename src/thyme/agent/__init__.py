"""The agent floor: the multi-turn loop, the trajectory record, replay of recorded responses.

- :mod:`thyme.agent.trajectory`  :class:`Trajectory` / :class:`Turn` (what eval, report, replay
  and verify read; imports nothing but the protocol)
- :mod:`thyme.agent.step`        the one step decision (what a finished segment means, the caps,
  the loop rule, the feedback), pure; the message driver here and the token driver
  (:mod:`thyme.rollout.driver`) both call it
- :mod:`thyme.agent.loop`        :class:`Agent`, :class:`AgentConfig`, :class:`Task`: the message
  driver over a backend and a sandbox session
- :mod:`thyme.agent.replay`      re-executing recorded Thyme responses through the same loop

Imports only downwards: protocol, sandbox, backends. Never data, evaluate, train, report or cli.
"""

from .loop import Agent, AgentConfig, Task
from .trajectory import StopReason, Trajectory, Turn

__all__ = ["Agent", "AgentConfig", "StopReason", "Task", "Trajectory", "Turn"]
