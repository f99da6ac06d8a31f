"""Where processed data lands: the local warehouse and profile store (embedded default)."""

from pipeline.stores.local import LocalWarehouse

__all__ = ["LocalWarehouse"]
