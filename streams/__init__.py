"""Omnistitch: real-time identity stitching on Kafka (pure core + thin faust glue)."""

__version__ = "0.4.7"
