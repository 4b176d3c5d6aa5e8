"""Layer 2, learning: data, partitions, models, tensors on the wire, sub-networks, evaluation.

Pure learning code: nothing here knows about devices, rounds, Flower's engine or Ray. It may
import the base modules (``fedsim.errors``, ``fedsim.seeding``, ``fedsim.keys``, ``fedsim.config``)
and nothing above (ARCHITECTURE.md; ``tests/test_architecture.py`` holds the rule).
"""
