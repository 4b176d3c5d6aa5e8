"""Layer 5, a run's rounds: the synchronous and asynchronous loops, the warm start, signals.

``synchronous`` (sample, send, aggregate, evaluate, record), ``asynchronous`` (FedBuff and
FedCompass on the simulated clock), ``warm_start`` (a stage before round 1), ``virtual_grid``
(many virtual clients on a few physical lanes, as a Flower ``Grid``), ``interrupt`` (SIGINT
and SIGTERM end a run cleanly), ``hooks`` (the optional hooks a strategy may have) and
``precheck`` (what a run or a sweep checks before it starts, building the run's own parts).
Imports every layer below; methods only through the contract.
"""
