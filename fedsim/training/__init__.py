"""Layer 4, the contract between the one ClientApp and the methods that plug into it.

``contract`` (``TrainContext``, ``TrainOutcome``, the ``ClientBehaviour`` and distillation
protocols, ``distillation_of``) and ``loop`` (the one mini-batch loop and the client-term
registry strategies add to). The methods in ``fedsim.clients`` and ``fedsim.strategies``
implement these; the layers above use them through this contract, never by importing a method.
"""
