"""Samples of accepted warehouse values for the value detectors.

:func:`sample_columns` decrypts the named partitions of one warehouse table (one period of one
institution each) into a private temporary folder with :func:`intake.warehouse.decrypt_accepted`,
reads at most :data:`SAMPLE_ROWS_PER_PARTITION` rows of each, and deletes the folder before it
returns. The samples live only in memory and are never logged; callers store match counts only.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq

from intake.warehouse import PeriodSelection, decrypt_accepted
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

SAMPLE_PARTITIONS = 3
"""Partitions sampled per table: the newest accepted period of up to this many institutions."""
SAMPLE_ROWS_PER_PARTITION = 1000
"""Rows read from the start of each sampled partition."""


@dataclass(frozen=True)
class PartitionRef:
    """One accepted partition to sample: institution, period end, and the accepted submissions it may hold."""

    institution_code: str
    period_end: date
    accepted_ids: Collection[int]


def _read_head(path: Path, columns: Sequence[str], max_rows: int) -> dict[str, list[str | None]]:
    parquet = pq.ParquetFile(path)
    present = [name for name in columns if name in parquet.schema_arrow.names]
    values: dict[str, list[str | None]] = {name: [] for name in present}
    if not present:
        return values
    for batch in parquet.iter_batches(batch_size=max_rows, columns=present):
        for name in present:
            values[name].extend(None if item is None else str(item) for item in batch.column(name).to_pylist())
        break
    return values


def sample_columns(
    settings: Settings,
    store: KeyStore,
    table_code: str,
    partitions: Sequence[PartitionRef],
    columns: Sequence[str],
    max_rows: int = SAMPLE_ROWS_PER_PARTITION,
) -> dict[str, list[str | None]]:
    """Return up to ``max_rows`` values per partition of each of ``columns`` of table ``table_code``.

    A partition that is missing or does not decrypt is left out (``decrypt_accepted`` logs it), so
    the result may be empty. Columns absent from a partition (an older template version) get no values from it.
    """
    samples: dict[str, list[str | None]] = {name: [] for name in columns}
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".catalog-sample-", dir=settings.data_dir) as work:
        for reference in partitions:
            selection = PeriodSelection(frozenset({reference.period_end.strftime("%Y%m%d")}))
            files = decrypt_accepted(settings, store, reference.institution_code, table_code, selection, Path(work),
                                     reference.accepted_ids)
            for path in files:
                for name, values in _read_head(path, columns, max_rows).items():
                    samples[name].extend(values)
                path.unlink(missing_ok=True)
    logger.info("sampled %d partitions of warehouse table %s", len(partitions), table_code)
    return samples
