"""Runnable examples (``python -m examples.class_collapse`` or ``python examples/class_collapse.py``)."""
