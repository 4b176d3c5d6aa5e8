"""Layer 6, the only code that touches Flower's simulation engine and Ray.

``simulation`` starts Ray and Flower's engine and runs the ``apps``; ``worker`` is what runs
inside a Ray worker (one lane message: several virtual clients trained in turn); ``faults``
injects client failures for the reliability tests.
"""
