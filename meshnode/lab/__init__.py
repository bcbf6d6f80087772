"""The routing lab: experiments on routing for researchers.

* ``python -m meshnode.lab sim SCENARIO.toml``: the discrete-event simulator
  (``sim``) drives the node's own router, directory and advert code for every strategy
  and writes JSON + PNG under ``bench/results/``;
* ``python -m meshnode.lab sweep SCENARIO.toml``: the same at several loads;
* ``python -m meshnode.lab profile SCENARIO.toml``: where a run's time goes;
* ``python -m meshnode.lab real SCENARIO.toml``: real ``meshnode`` processes in Linux
  network namespaces behind ``tc netem`` links from the same latency model, and the
  simulator on the same scenario, side by side (needs root and iproute2).

The lab sits on top of the node (it imports ``core``, ``p2p`` constants and ``node``);
nothing in the node imports the lab.
"""
