"""Deployed parties: the aggregator and each cloud as its own process (serve.py), a local launcher (launch.py), and the keys CLI (keys.py)."""
