"""Check digits of 18-character identifiers, as vectorised DuckDB functions.

:mod:`intake.validate` writes each check digit test as SQL by default (``_uscc_checksum_ok``,
``_ric_checksum_ok``). That SQL takes 17 ``substr`` calls per value: on the 1,000,000-row file of
benchmarks/intake_validation.py the USCC test cost about 0.7 CPU seconds of one core. The
functions here compute the same test with numpy over a whole DuckDB vector (Arrow array) at a
time, for about a quarter of that. :func:`register` adds them to a connection, and the
validator's direct scan of a text file uses them.

Each check digit function returns true exactly when the SQL test would for a value of 18 ASCII
characters of the code's alphabet. The validator tests the length and pattern first, so for other
values the result only has to be false or NULL, never an error. :data:`USCC_VALID_FUNCTION` tests
the pattern as well, so a scan needs neither a length test nor a regular expression before it.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

__all__ = [
    "RESIDENT_ID_FUNCTION", "USCC_FUNCTION", "USCC_VALID_FUNCTION", "register", "resident_id_ok", "uscc_ok", "uscc_valid",
]

USCC_FUNCTION = "rs_uscc_check_digit_ok"
USCC_VALID_FUNCTION = "rs_uscc_valid"
RESIDENT_ID_FUNCTION = "rs_resident_id_check_digit_ok"

_WIDTH = 18
_INVALID = -10_000  # value of a character outside the alphabet, which makes the weighted sum negative
_USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"  # GB 32100-2015, 31 characters
_USCC_WEIGHTS = np.array((1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28), dtype=np.int64)
_RIC_WEIGHTS = np.array((7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2), dtype=np.int64)
_RIC_CHECK = np.frombuffer(b"10X98765432", dtype=np.uint8)  # GB 11643-1999: check character by sum mod 11


def _values(alphabet: str) -> np.ndarray:
    table = np.full(256, _INVALID, dtype=np.int64)
    for value, character in enumerate(alphabet):
        table[ord(character)] = value
    return table


_USCC_VALUES = _values(_USCC_ALPHABET)
_DIGIT_VALUES = _values("0123456789")


def _fixed_width(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Return (indices of the values that are 18 bytes long, their bytes as an n × 18 matrix)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_large_string(array.type):
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int64, count=len(array) + 1, offset=array.offset * 8)
    else:
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32, count=len(array) + 1, offset=array.offset * 4)
    data_buffer = array.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1].astype(np.int64)
    rows = np.flatnonzero(np.diff(offsets) == _WIDTH)
    matrix = data[starts[rows, None] + np.arange(_WIDTH)]
    return rows, matrix


def _result(array: pa.Array, rows: np.ndarray, good: np.ndarray) -> pa.Array:
    out = np.zeros(len(array), dtype=bool)
    out[rows] = good
    mask = np.asarray(array.is_null()) if array.null_count else None
    return pa.array(out, type=pa.bool_(), mask=mask)


def uscc_ok(array: pa.Array) -> pa.Array:
    """Return whether each 统一社会信用代码 ends with the check character of its first 17 (GB 32100-2015)."""
    rows, matrix = _fixed_width(array)
    values = _USCC_VALUES[matrix]
    total = values[:, :17] @ _USCC_WEIGHTS
    good = (total >= 0) & (values[:, 17] == (31 - total % 31) % 31)
    return _result(array, rows, good)


def uscc_valid(array: pa.Array) -> pa.Array:
    """Return whether each value matches ``[0-9]{8}[0-9A-HJ-NP-RTUW-Y]{10}`` and ends with its check character.

    Any other value, a text of other than 18 bytes included, gives false (NULL for NULL).
    """
    rows, matrix = _fixed_width(array)
    values = _USCC_VALUES[matrix]
    values[:, :8] = _DIGIT_VALUES[matrix[:, :8]]
    # One character outside its alphabet adds at most -10,000; all the others at most 30 × 305.
    total = values[:, :17] @ _USCC_WEIGHTS
    good = (total >= 0) & (values[:, 17] == (31 - total % 31) % 31)
    return _result(array, rows, good)


def resident_id_ok(array: pa.Array) -> pa.Array:
    """Return whether each 居民身份证号码 ends with the check character of its first 17 digits (GB 11643-1999)."""
    rows, matrix = _fixed_width(array)
    digits = _DIGIT_VALUES[matrix[:, :17]]
    total = digits @ _RIC_WEIGHTS
    good = (total >= 0) & (_RIC_CHECK[np.clip(total, 0, None) % 11] == matrix[:, 17])
    return _result(array, rows, good)


def register(con: duckdb.DuckDBPyConnection) -> None:
    """Add the check digit functions to ``con`` (VARCHAR → BOOLEAN, NULL for NULL)."""
    for name, function in ((USCC_FUNCTION, uscc_ok), (USCC_VALID_FUNCTION, uscc_valid),
                           (RESIDENT_ID_FUNCTION, resident_id_ok)):
        con.create_function(name, function, [duckdb.sqltype("VARCHAR")], duckdb.sqltype("BOOLEAN"),
                            type="arrow", side_effects=False)
