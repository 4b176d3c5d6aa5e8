"""Layer 3, the simulated fleet: devices, their per-round conditions and costs, the clock.

``devices`` (profiles, fleet, cost model, ``SimClock``), ``scheduler`` (who is online, fits
and is late in a synchronous round) and ``server_view`` (what a strategy may read: only what a
real server knows when it decides). Imports learning and base, nothing above.
"""
