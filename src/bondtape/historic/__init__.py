"""Historic TRACE Data: aged, uncapped, identity-free data sets per data set and year.

``build_data_set(db, "corporate", 2024, as_of, out)`` writes FINRA Enhanced Time and Sales
text files, Parquet with WRDS ``trace_enhanced`` names, the exact final-state view and a
manifest. See docs/historic.md.
"""
from bondtape.historic import schema as _schema  # noqa: F401  (registers the closed-reports index)
from bondtape.historic.builder import (
    DATA_SETS, BuildResult, HistoricError, build_data_set, check_available, coverage, ehts_lines, trailer,
)
from bondtape.historic.layout import COLUMNS, HEADER, LAYOUT, RECORD_FORMAT, data_dictionary, data_dictionary_json
from bondtape.historic.records import reference_number

__all__ = [
    "BuildResult", "COLUMNS", "DATA_SETS", "HEADER", "HistoricError", "LAYOUT", "RECORD_FORMAT",
    "build_data_set", "check_available", "coverage", "data_dictionary", "data_dictionary_json", "ehts_lines",
    "reference_number", "trailer",
]
