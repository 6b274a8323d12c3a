"""oemrelay's tests (run with ``python -m twisted.trial tests``)."""
