"""fedsim: federated-learning simulation of heterogeneous mobile devices on Flower and Ray."""

__version__ = "0.1.0"
