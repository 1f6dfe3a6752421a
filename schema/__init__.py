"""The typed contract every layer reads: the ``consortium.yaml`` schema and its errors, the adapters
from it to the ``omics`` and ``models`` settings, the names FLARE sites and tools share, and the
``report.json`` schema.

The bottom of the layers: it imports pydantic and yaml, never another package of this project.
"""
