"""Raw data set -> ``train.json`` + ``test.json`` in the pipeline's format.

The command is ``ktflow prepare-task`` (:mod:`ktflow.steps.prepare_task`).

The spec is the task's block of the config (the ``prepare_task`` rule passes it). Everything
is read and checked before anything is written; both files and ``OUT_DIR/provenance.json``
are written atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ktflow.atomic import sha256_file, write_json
from ktflow.datasets.adapters import adapter_for
from ktflow.datasets.contract import check_task_rows
from ktflow.datasets.sources import raw_source
from ktflow.datasets.split import SplitSpec, split_examples
from ktflow.errors import KtflowInputError

log = logging.getLogger(__name__)


def prepare(spec: dict[str, Any], out_dir: Path, cache_dir: Path, name: str = "row") -> dict[str, Any]:
    """Fetch, adapt, check and split one task's raw data; returns counts for provenance."""
    adapter = adapter_for(spec.get("adapter", ""), spec.get("on_invalid", "error"))
    kind = spec.get("kind")
    if adapter.kind is not None and kind is not None and kind != adapter.kind:
        raise KtflowInputError(
            None, "kind", f"adapter {adapter.name} makes {adapter.kind} rows, the task says {kind}"
        )
    split = SplitSpec.from_config(spec.get("split", {}), seed=int(spec.get("seed", 42)))
    source = raw_source(spec)
    raw = source.fetch(cache_dir)
    adapted = adapter.read(raw, id_prefix=name)
    for message in adapted.first_invalid:
        log.warning("skipped invalid row: %s", message)
    train, test, dropped = split_examples(adapted.examples, split, adapter.has_split_column)
    files = {out_dir / "train.json": train, out_dir / "test.json": test}
    for path, examples in files.items():  # both checked before either is written
        check_task_rows(path, [row.as_row() for row in examples])
    for path, examples in files.items():
        write_json(path, [row.as_row() for row in examples])
    facts = {
        "raw": {**source.describe(), "path": str(raw), "sha256": sha256_file(raw)},
        "adapter": adapter.name,
        "rows": {"usable": len(adapted.examples), "train": len(train), "test": len(test)},
        "left_out": dict(adapted.left_out + dropped),
    }
    log.info(
        "%s: %d train / %d test rows from %s (left out: %s)",
        name,
        len(train),
        len(test),
        raw,
        facts["left_out"],
    )
    return facts
