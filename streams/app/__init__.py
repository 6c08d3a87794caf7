"""The faust stream app: topics, the worker and its CLI (thin glue around the pure core)."""
