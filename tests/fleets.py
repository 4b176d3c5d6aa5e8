"""Fleet pieces the device tests share (imported as ``fleets``, like ``recipe_examples``)."""

#: Device dynamics with no variation: compute and bandwidth stay at the profile's nominal values
#: and the channel never turns bad, so latencies and energies can be checked by hand.
STILL = {
    "compute_sigma": 0.0,
    "bandwidth_sigma": 0.0,
    "p_good_to_bad": 0.0,
    "p_bad_to_good": 1.0,
    "bad_bandwidth_factor": 1.0,
}
