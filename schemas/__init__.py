"""Event contracts: frozen pydantic models, one module per topic family (data only, no behaviour)."""
