"""Observability: Prometheus metrics, the JSON state behind the web page and ``top``, logs."""
