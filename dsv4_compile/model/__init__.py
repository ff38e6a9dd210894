"""DSv4 attention written in the plain form: readable PyTorch over the primitive dsv4 ops."""

from .indexer import IndexerQ  # noqa: F401
