"""Raw data sets -> the pipeline's task files: adapters, raw sources and splits.

``ktflow prepare-task`` (``src/ktflow/steps/prepare_task.py``) chains them for one task.
"""

from ktflow.datasets.adapters import ADAPTERS, Adapted, Example, RawAdapter, adapter_for
from ktflow.datasets.sources import SOURCES, RawSource, raw_source
from ktflow.datasets.split import SplitSpec, split_examples

__all__ = [
    "ADAPTERS",
    "SOURCES",
    "Adapted",
    "Example",
    "RawAdapter",
    "RawSource",
    "SplitSpec",
    "adapter_for",
    "raw_source",
    "split_examples",
]
