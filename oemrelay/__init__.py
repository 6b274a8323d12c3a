"""oemrelay: a relay for Digital Matter GPS trackers."""

__version__ = "0.1.0"
