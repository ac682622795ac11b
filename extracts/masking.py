"""DuckDB SQL for the treatments of a masking policy, and the token dictionary joined in for ``token``.

Tokens are computed once per distinct value in Python (HMAC-SM3 of the UTF-8 value under the
institution's tokenisation key, see :func:`regsandbox_core.crypto.keyed_token`) and joined to
the rows in SQL. A per-row Python function would call into Python for every row, which is much
slower than one dictionary lookup per distinct value.

Every expression keeps NULL as NULL. Values are read as text (``CAST(... AS VARCHAR)``) before
a mask or a generalisation, so the expressions also work on the typed columns of the demo table.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from catalog.classes import ColumnClass
from extracts.policy import COMPOUND_SURNAMES, PARTIAL_MASKS, Band, QuasiIdentifier, Rule
from regsandbox_core.crypto import TOKEN_SIZE

TOKEN_TABLE = "_tokens"
"""Name of the registered Arrow table (``value``, ``token``) that token columns join with."""


HELPER_PREFIX = "__mask_"
"""Prefix of the helper columns of :func:`select_sql`; no template field code starts with it."""


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class ColumnPlan:
    """Treatment plan of one source column: its class, the matching rule and the treatment.

    ``quasi_identifier`` is set when the policy generalises a declared quasi-identifier that its
    class rule would keep; ``treatment`` is then ``generalise``.
    """

    name: str
    column_class: ColumnClass
    classified: bool
    rule_id: str
    treatment: str
    bands: tuple[Band, ...] = ()
    quasi_identifier: QuasiIdentifier | None = None

    @classmethod
    def from_rule(cls, name: str, column_class: ColumnClass, classified: bool, rule: Rule) -> ColumnPlan:
        return cls(name, column_class, classified, rule.id, rule.treatment, rule.bands)

    def manifest_entry(self) -> dict:
        entry = {
            "name": self.name,
            "class": {"level": self.column_class.level, "pi_category": self.column_class.pi_category,
                      "kind": self.column_class.kind},
            "classified": self.classified,
            "rule": self.rule_id,
            "treatment": self.treatment,
        }
        if self.quasi_identifier is not None:
            entry["generalisation"] = self.quasi_identifier.generalisation()
        return entry


def _text(source: str) -> str:
    return f"CAST({source} AS VARCHAR)"


def _trimmed(text: str) -> str:
    """Return ``trim(text)``, calling trim() only for a value that starts or ends with a space.

    trim() copies every value, which cost about 1 CPU second per 10,000,000 addresses here; the two
    byte tests cost a quarter of that.
    """
    return f"CASE WHEN starts_with({text}, ' ') OR ends_with({text}, ' ') THEN trim({text}) ELSE {text} END"


def _keep_ends(value: str, first: int, last: int) -> str:
    """Keep ``first`` leading and ``last`` trailing characters and star the middle; star all of a short value."""
    kept = first + last
    tail = f" || right({value}, {last})" if last else ""
    return (f"CASE WHEN length({value}) > {kept} THEN left({value}, {first}) || repeat('*', length({value}) - {kept})"
            f"{tail} ELSE repeat('*', length({value})) END")


def _surname(value: str) -> str:
    # The surname test comes first and once: testing it in each of the three places that need the
    # surname's length made the name mask about 1.8× as dear (benchmarks/extract_build.py).
    compound = ", ".join(quote_literal(surname) for surname in COMPOUND_SURNAMES)
    return f"CASE WHEN left({value}, 2) IN ({compound}) THEN {_keep_ends(value, 2, 0)} ELSE {_keep_ends(value, 1, 0)} END"


def _year(value: str) -> str:
    return f"CASE WHEN regexp_matches({value}, '^[0-9]{{4}}') THEN left({value}, 4) END"


def _city(value: str) -> str:
    # Province (省/自治区) if any, then the first city-level unit (市/自治州/地区/盟). For a
    # municipality such as 上海市 the city is the first unit. No match gives NULL, never the raw value.
    # The units may not contain district, county, road, street or house-number characters, so a
    # text without a city yields NULL instead of a street.
    # The whole match is the result, so no capture group: asking RE2 for a group's bounds made
    # the extraction about twice as dear (benchmarks/extract_build.py, 1,000,000 distinct addresses).
    unit = "[^省市区县路街号0-9]{2,}?"
    pattern = f"^(?:{unit}(?:省|自治区))?{unit}(?:市|自治州|地区|盟)"
    return f"NULLIF(regexp_extract({value}, {quote_literal(pattern)}), '')"


def _amount(value: str) -> str:
    return f"TRY_CAST(replace({value}, ',', '') AS DECIMAL(38, 4))"


def _band(amount: str, bands: tuple[Band, ...]) -> str:
    """Return the band label of ``amount`` (a DECIMAL expression, see :func:`_amount`)."""
    cases = [f"WHEN {amount} IS NULL THEN NULL"]
    for band in bands:
        if band.below is None:
            cases.append(f"ELSE {quote_literal(band.label)}")
        else:
            cases.append(f"WHEN {amount} < {band.below} THEN {quote_literal(band.label)}")
    return "CASE " + " ".join(cases) + " END"


def _uses_bands(plan: ColumnPlan) -> bool:
    if plan.quasi_identifier is not None:
        return not plan.quasi_identifier.prefix
    return plan.treatment == "generalise" and plan.column_class.kind not in ("birth_date", "address")


def column_expression(plan: ColumnPlan, source: str, token_alias: str | None, *, value: str | None = None,
                      amount: str | None = None) -> str | None:
    """Return the SELECT expression of a column (aliased to its name), or None when it is dropped.

    ``value`` and ``amount`` name columns that already contain the trimmed text of ``source`` and
    its decimal value (see :func:`select_sql`). Without them the expression computes both itself.
    """
    name = quote_identifier(plan.name)
    treatment = plan.treatment
    if treatment == "drop":
        return None
    if treatment == "keep" and plan.quasi_identifier is None:
        return f"{source} AS {name}"
    if treatment == "token":
        return f"{token_alias}.token AS {name}"
    value = value or _trimmed(_text(source))
    kind = plan.column_class.kind
    if _uses_bands(plan):
        bands = plan.quasi_identifier.bands if plan.quasi_identifier is not None else plan.bands
        expression = _band(amount or _amount(value), bands)
    elif plan.quasi_identifier is not None:
        expression = f"left({value}, {plan.quasi_identifier.prefix})"
    elif treatment == "partial_mask":
        expression = _surname(value) if kind == "person_name" else _keep_ends(value, *PARTIAL_MASKS[kind])
    elif kind == "birth_date":
        expression = _year(value)
    else:
        expression = _city(value)
    # Every expression above gives NULL for NULL. Wrapping it in CASE WHEN value IS NULL made the
    # address generalisation about 1.6× as dear in benchmarks/extract_build.py.
    return f"{expression} AS {name}"


@dataclass(frozen=True)
class CarrierMark:
    """A kept column that :func:`select_sql` writes with a watermark's data mark in the same query.

    Each row's bit is the ``bit`` column of the token table (:data:`TOKEN_TABLE`) row joined for
    ``key_column``, a token column. ``helpers(carrier)`` returns the SQL of values that the inner
    projection computes once per row from the carrier value. ``expression(carrier, bit, helpers)``
    returns the SQL of the marked value from the SQL of the carrier value, the bit and the helper
    columns. (The marked value refers to each helper several times inside a CASE, where DuckDB
    computed it again for each reference.)
    """

    key_column: str
    carrier: str
    helpers: Callable[[str], list[str]]
    expression: Callable[[str, str, list[str]], str]


def select_sql(plans: Iterable[ColumnPlan], relation: str, mark: CarrierMark | None = None) -> str:
    """Return the SELECT of the masked table over ``relation`` with one token join per token column.

    An inner projection computes the trimmed text of every masked column once, and for bands its
    decimal value. The mask expressions above it refer to the value several times, so computing it
    per reference cost about 3× the CPU time for bands in benchmarks/extract_build.py. With ``mark``
    the carrier column is written marked, with the bit from its key column's token join.
    """
    plans = list(plans)
    aliases = {plan.name: f"t{index}" for index, plan in enumerate(plans) if plan.treatment == "token"}
    inner: list[str] = ["src.*"]
    expressions: list[str] = []
    joins: list[str] = []
    for index, plan in enumerate(plans):
        source = f"src.{quote_identifier(plan.name)}"
        alias = value = amount = None
        if mark is not None and plan.name == mark.carrier:
            helpers = []
            for number, helper in enumerate(mark.helpers(source)):
                helper_name = quote_identifier(f"{HELPER_PREFIX}c{index}_{number}")
                inner.append(f"{helper} AS {helper_name}")
                helpers.append(f"src.{helper_name}")
            marked = mark.expression(source, aliases[mark.key_column] + ".bit", helpers)
            expressions.append(f"{marked} AS {quote_identifier(plan.name)}")
            continue
        if plan.treatment == "token":
            alias = aliases[plan.name]
            joins.append(f"LEFT JOIN {TOKEN_TABLE} AS {alias} ON {alias}.value = {_text(source)}")
        elif plan.treatment != "drop" and not (plan.treatment == "keep" and plan.quasi_identifier is None):
            value_name = quote_identifier(f"{HELPER_PREFIX}v{index}")
            inner.append(f"{_trimmed(_text(source))} AS {value_name}")
            value = f"src.{value_name}"
            if _uses_bands(plan):
                amount_name = quote_identifier(f"{HELPER_PREFIX}n{index}")
                inner.append(f"{_amount(_trimmed(_text(source)))} AS {amount_name}")
                amount = f"src.{amount_name}"
        expression = column_expression(plan, source, alias, value=value, amount=amount)
        if expression is not None:
            expressions.append(expression)
    return (f"SELECT {', '.join(expressions)} FROM (SELECT {', '.join(inner)} FROM {relation} AS src) AS src "
            f"{' '.join(joins)}")


def _distinct_sql(relation: str, columns: list[str]) -> str:
    # DISTINCT as well as UNION: with one token column there is no UNION to remove repeated values,
    # and a repeated value in the dictionary would repeat rows in the join.
    return " UNION ".join(
        f"SELECT DISTINCT {_text(quote_identifier(column))} AS value FROM {relation} "
        f"WHERE {quote_identifier(column)} IS NOT NULL"
        for column in columns
    )


def distinct_text_array(con: duckdb.DuckDBPyConnection, relation: str, columns: list[str]) -> pa.Array:
    """Return every distinct non-null value of ``columns`` in ``relation`` as text (the text tokens are computed from)."""
    return con.sql(_distinct_sql(relation, columns)).to_arrow_table().column("value").combine_chunks()


def distinct_text_values(con: duckdb.DuckDBPyConnection, relation: str, columns: list[str]) -> list[str]:
    """Return :func:`distinct_text_array` as a list of strings."""
    return distinct_text_array(con, relation, columns).to_pylist()


def value_with_token(values: Iterable[str], keys: Sequence[bytes], token: bytes) -> tuple[str, int] | None:
    """Return the first value whose token under one of ``keys`` is ``token``, with that key's index, or None.

    The tokens are those of :func:`regsandbox_core.crypto.keyed_token` (which gives them as hex),
    compared as bytes and without building a dictionary, so a search stops at its match.
    """
    keyed = [crypto_hmac.HMAC(key, hashes.SM3()) for key in keys]
    for value in values:
        data = value.encode("utf-8")
        for index, base in enumerate(keyed):
            mac = base.copy()
            mac.update(data)
            if mac.finalize()[:TOKEN_SIZE] == token:
                return value, index
    return None


def _hex_strings(digests: bytes, count: int) -> pa.Array:
    """Return the lower-case hex of ``count`` concatenated tokens of :data:`TOKEN_SIZE` bytes as a string array.

    Arrow builds the array from one buffer, without a Python string per token.
    """
    width = 2 * TOKEN_SIZE
    offsets = np.arange(0, width * (count + 1), width, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(digests.hex().encode("ascii"))])


class TokenDictionary:
    """The (value, token) table of the distinct values of token columns, built from one relation at a time.

    :meth:`add` tokenises only the values that earlier calls did not add, so the partitions of a
    table can be added as each one is decrypted. The token is the lower-case hex of the HMAC-SM3
    of the UTF-8 value under ``key``, truncated as :func:`regsandbox_core.crypto.keyed_token`
    does. ``cache`` (UTF-8 value -> token bytes under ``key``) carries tokens from one table to
    the next within a build, so a customer seen in several tables is tokenised once.
    """

    def __init__(self, key: bytes, con: duckdb.DuckDBPyConnection, cache: dict[bytes, bytes] | None = None) -> None:
        self._keyed = crypto_hmac.HMAC(key, hashes.SM3())
        self._cache = {} if cache is None else cache
        self._values: list[pa.Array] = []
        self._tokens: list[pa.Array] = []
        self._bit_function: Callable[[pa.Array], pa.Array] | None = None
        self._bits: list[pa.Array] = []
        # The values added so far live in a temporary table of ``con``. (A connection of its own
        # cost 16 ms per table, which added up over 400 institutions' small tables.)
        self._con = con
        self._known = quote_identifier(f"__token_known_{secrets.token_hex(8)}")
        con.sql(f"CREATE TEMP TABLE {self._known} (value VARCHAR)")

    def add(self, relation: str, columns: list[str]) -> None:
        """Add the distinct non-null values of ``columns`` in ``relation`` (on the dictionary's connection) not added before."""
        if not columns:
            return
        batch = quote_identifier(f"__token_batch_{secrets.token_hex(8)}")
        try:
            self._con.sql(f"CREATE TEMP TABLE {batch} AS SELECT value FROM ({_distinct_sql(relation, columns)}) AS incoming "
                          f"ANTI JOIN {self._known} USING (value)")
            self._con.sql(f"INSERT INTO {self._known} SELECT value FROM {batch}")
            values = self._con.sql(f"SELECT value FROM {batch}").to_arrow_table().column("value").combine_chunks()
        finally:
            self._con.sql(f"DROP TABLE IF EXISTS {batch}")
        if len(values):
            self._values.append(values)
            self._tokens.append(_hex_strings(self._digests(values), len(values)))
            if self._bit_function is not None:
                self._bits.append(self._bit_function(self._tokens[-1]))

    def compute_bits(self, function: Callable[[pa.Array], pa.Array]) -> None:
        """Give :meth:`table` a ``bit`` column: ``function(tokens)`` (int8) of the tokens added so far and of each later batch.

        The bits of a watermark's data mark (:meth:`extracts.watermark.BuildWatermark.token_bits`) are
        then computed batch by batch, while the next partitions are decrypted.
        """
        if self._bit_function is not None:
            return  # Called for each batch: the first call's function stays.
        self._bit_function = function
        self._bits = [function(tokens) for tokens in self._tokens]

    def _digests(self, values: pa.Array) -> bytes:
        """Return the tokens of ``values`` (distinct strings) as one buffer of :data:`TOKEN_SIZE`-byte tokens."""
        # Copying a keyed HMAC object is about twice as fast as keying a new one for every value,
        # and Arrow gives the UTF-8 bytes without an encode() per value. The per-value dictionary
        # lookups are made only when an earlier table filled the cache.
        data = values.cast(pa.binary()).to_pylist()
        copy = self._keyed.copy
        cache = self._cache
        digests = []
        append = digests.append
        if cache:
            for item in data:
                digest = cache.get(item)
                if digest is None:
                    mac = copy()
                    mac.update(item)
                    digest = cache[item] = mac.finalize()[:TOKEN_SIZE]
                append(digest)
        else:
            for item in data:
                mac = copy()
                mac.update(item)
                append(mac.finalize()[:TOKEN_SIZE])
            cache.update(zip(data, digests))
        return b"".join(digests)

    def close(self) -> None:
        """Drop the table of values added; :meth:`table` still works."""
        self._con.sql(f"DROP TABLE IF EXISTS {self._known}")

    def table(self) -> pa.Table:
        """Return the (value, token) table of every value added, each value once, and ``bit`` after :meth:`compute_bits`."""
        columns = {"value": pa.chunked_array(self._values, pa.string()), "token": pa.chunked_array(self._tokens, pa.string())}
        if self._bit_function is not None:
            columns["bit"] = pa.chunked_array(self._bits, pa.int8())
        return pa.table(columns)


def token_dictionary(con: duckdb.DuckDBPyConnection, relation: str, columns: list[str], key: bytes,
                     cache: dict[bytes, bytes] | None = None) -> pa.Table:
    """Return the (value, token) table of every distinct non-null value of ``columns`` in ``relation``.

    See :class:`TokenDictionary` for the tokens and ``cache``.
    """
    dictionary = TokenDictionary(key, con, cache)
    try:
        dictionary.add(relation, columns)
    finally:
        dictionary.close()
    return dictionary.table()


def parquet_options(metadata: Mapping[str, str] | None = None) -> str:
    """Return the COPY options of an extract table: zstd Parquet, with ``metadata`` as key-value metadata."""
    options = "FORMAT parquet, COMPRESSION zstd"
    if metadata:
        pairs = ", ".join(f"{quote_literal(key)}: {quote_literal(value)}" for key, value in metadata.items())
        options += f", KV_METADATA {{{pairs}}}"
    return options


_PIPE_CHUNK = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def copy_with_sm3(con: duckdb.DuckDBPyConnection, query: str, target: Path, options: str, pipe_dir: Path) -> str:
    """Run ``COPY (query) TO target (options)`` and return the SM3 of the file, hashed while DuckDB writes it.

    DuckDB writes into a named pipe in ``pipe_dir``. A thread reads the pipe, hashes what it reads
    and writes it to ``target``, so the digest costs no second read of the file after the COPY
    (1.1 s for the 382 MiB of benchmarks/extract_build.py). DuckDB's Parquet writer writes its file
    from start to end. A seek on a pipe fails, so a writer that seeked would make the COPY fail
    rather than write a wrong file. ``target`` is deleted when anything fails.
    """
    pipe = pipe_dir / f".copy-{secrets.token_hex(8)}.pipe"
    os.mkfifo(pipe, 0o600)
    failures: list[BaseException] = []
    digest: list[str] = []
    try:
        # The read end is opened here, then a write end that stays open until the COPY returns, so
        # the reader sees the end of the data only then, whether DuckDB opened the pipe or not.
        reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
        keeper = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        os.set_blocking(reader, True)
        try:
            fcntl.fcntl(reader, _F_SETPIPE_SZ, _PIPE_CHUNK)
        except OSError:
            pass

        def drain() -> None:
            hasher = hashes.Hash(hashes.SM3())
            sink = None
            try:
                sink = open(target, "wb")
            except OSError as error:
                failures.append(error)
            with os.fdopen(reader, "rb", buffering=0) as source:
                # After a failed write the pipe is still read to its end: DuckDB would wait on a full pipe.
                while chunk := source.read(_PIPE_CHUNK):
                    if sink is None:
                        continue
                    hasher.update(chunk)
                    try:
                        sink.write(chunk)
                    except OSError as error:
                        failures.append(error)
                        sink.close()
                        sink = None
            if sink is not None:
                sink.close()
                digest.append(hasher.finalize().hex())

        thread = threading.Thread(target=drain, name="extract-copy-sm3", daemon=True)
        thread.start()
        try:
            con.sql(f"COPY ({query}) TO {quote_literal(str(pipe))} ({options}, USE_TMP_FILE false)")
        finally:
            os.close(keeper)
            thread.join()
        if failures:
            raise failures[0]
        return digest[0]
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    finally:
        pipe.unlink(missing_ok=True)


def merge_periods(previous: Path, kept_periods: list[str], changed: Path | None, target: Path, work_dir: Path,
                  metadata: Mapping[str, str] | None = None) -> str:
    """Write the rows of ``kept_periods`` (column ``_period``) of ``previous``, then all rows of ``changed``, to ``target``.

    One scan over both files with a filter keeps their order, because DuckDB preserves insertion
    order (its default, set here explicitly), so no sort is needed. ``work_dir`` is a private
    folder for spilled rows and the pipe of :func:`copy_with_sm3`. Returns the SM3 of ``target``.
    """
    files = [previous] if changed is None else [previous, changed]
    listing = "[" + ", ".join(quote_literal(str(path)) for path in files) + "]"
    periods = ", ".join(quote_literal(period) for period in kept_periods) or "NULL"
    con = duckdb.connect(":memory:")
    try:
        con.sql(f"SET temp_directory={quote_literal(str(work_dir / 'spill'))}")
        con.sql("SET preserve_insertion_order=true")
        query = (f"SELECT * EXCLUDE (_extract_file) FROM read_parquet({listing}, union_by_name=true, "
                 f"filename='_extract_file') WHERE _extract_file <> {quote_literal(str(previous))} "
                 f"OR _period IN ({periods})")
        return copy_with_sm3(con, query, target, parquet_options(metadata), work_dir)
    finally:
        con.close()
