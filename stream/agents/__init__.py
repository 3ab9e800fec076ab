"""The Faust side of a worker: each agent, timer and task of :func:`stream.app.create_app`
as a small object over the plain services of :mod:`stream.services`.

One module per room, in flow order:

- :mod:`~stream.agents.outputs`: the raw topics, dead letters and stage errors all share;
- :mod:`~stream.agents.joiner`: ``impressions`` + ``clicks`` → join state → ``labeled``;
- :mod:`~stream.agents.trainer`: ``labeled`` → model steps → ``scored``, index, store;
- :mod:`~stream.agents.monitor`: ``scored`` → drift and calibration → ``control``; gauges;
- :mod:`~stream.agents.control`: ``control`` → every worker's calibrator and versions;
- :mod:`~stream.agents.replica`: a ``serve`` worker's model-store versions;
- :mod:`~stream.agents.follower`: ``impressions`` + ``clicks`` → the feature stages of a
  worker that serves without joining;
- :mod:`~stream.agents.web`: ``/recommend``, ``/score``, ``/version``, ``/health``.
"""

from stream.agents.control import ControlAgent
from stream.agents.follower import FeatureFollowerAgent
from stream.agents.joiner import JoinerAgents
from stream.agents.monitor import Gauges, MonitorAgent
from stream.agents.outputs import Outputs
from stream.agents.replica import ReplicaAgents
from stream.agents.trainer import TrainerAgents
from stream.agents.web import install_web

__all__ = [
    "ControlAgent",
    "FeatureFollowerAgent",
    "Gauges",
    "JoinerAgents",
    "MonitorAgent",
    "Outputs",
    "ReplicaAgents",
    "TrainerAgents",
    "install_web",
]
