"""Compression and export (ALGORITHM.md section 4).

* :mod:`~lorashear.compression.slicing` - kept indices, in-place slicing, size reconciliation, the replayable plan;
* :mod:`~lorashear.compression.compress` - the compression stage verb :func:`compress` with its exactness check;
* :mod:`~lorashear.compression.export` - the export stage verb :func:`export`: Hugging Face directories that stock
  ``from_pretrained`` loads, checked by reloading them.
"""

from lorashear.compression.compress import CompressionResult, apply_removed, compress
from lorashear.compression.export import ExportResult, export, load_exported, stock_loadable
from lorashear.compression.slicing import apply_plan, check_exact, kept_indices, make_plan, rescale_norms_, slice_

__all__ = [
    "CompressionResult",
    "ExportResult",
    "apply_plan",
    "apply_removed",
    "check_exact",
    "compress",
    "export",
    "kept_indices",
    "load_exported",
    "make_plan",
    "rescale_norms_",
    "slice_",
    "stock_loadable",
]
