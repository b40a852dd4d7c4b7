"""The Tailguard node agent: enrolls, discovers, applies signed desired state, reports."""

__version__ = "0.1.0"
