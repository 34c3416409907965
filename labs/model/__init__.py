"""An internet-scale model of proactive server roaming: ``roam model`` (docs/model.md).

Vectorised with numpy; no sockets, no clock, randomness from a seeded generator. Modules:

* ``params``: the scenario's parameters and their validation;
* ``schedule``: a vectorised k-of-N roaming schedule (epoch lengths, active sets, each
  client's server per epoch);
* ``queueing``: the per-server queueing approximation (fluid backlog + M/M/1/K);
* ``engine``: one defence under one attack: legitimate requests served and response times;
* ``analytic``: the paper's analytic figures next to their simulated counterparts;
* ``isolation``: epochs until insiders rank above every innocent client;
* ``fig2check``: the model at the scale of ``roam lab fig2``, next to the lab's figures;
* ``run``: the whole default scenario, its table, JSON and plot.
"""
