"""The README's optimizer table against the registry: the one hand-written place that describes every optimizer.

A registered optimizer without a row, a row for a name that is not registered, a missing alias or CLI flag, or a
refused mode the row calls supported fails here, so the table cannot drift from the specs.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import apollo
from apollo.registry import get_spec

README = Path(__file__).resolve().parents[1] / "README.md"
#: how the table's modes column names each refused spec mode
MODE_WORDS = {"weight_quant": "int8", "fsdp": "--fsdp", "layerwise": "--layerwise"}


def optimizer_rows() -> dict[str, list[str]]:
    """`--optimizer` table rows by their name: the cells of each row (name cell, what, state, flags, modes)."""
    lines = README.read_text().splitlines()
    start = lines.index("| `--optimizer` | what it is | state per m x n | its flags | modes |")
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows[re.match(r"`([a-z0-9_]+)`", cells[0]).group(1)] = cells
    return rows


def row_flags(rows: dict[str, list[str]], name: str) -> set[str]:
    """The --flags a row names, following "as apollo" / "as galore" to the row it refers to."""
    flags_cell = rows[name][3]
    flags = set(re.findall(r"--([a-z0-9_]+)", flags_cell))
    for other in re.findall(r"\bas ([a-z0-9_]+)\b", flags_cell):
        flags |= row_flags(rows, other)
    return flags


def test_every_registered_optimizer_has_one_row_and_no_row_is_unregistered():
    rows = optimizer_rows()
    names = apollo.optimizer_names()
    assert len(names) >= 13 and len(rows) >= 13
    assert sorted(rows) == sorted(names)


def test_each_row_names_the_specs_aliases_cli_flags_and_refused_modes():
    rows = optimizer_rows()
    for name in apollo.optimizer_names():
        spec = get_spec(name)
        cells = rows[name]
        assert sorted(re.findall(r"`([a-z0-9_]+)`", cells[0])) == sorted((name, *spec.aliases)), name
        missing = set(spec.flags) - row_flags(rows, name)
        assert not missing, f"README row {name} lacks --{', --'.join(sorted(missing))}"
        modes = cells[4]
        for mode in spec.refuses:
            assert MODE_WORDS[mode] in modes and modes != "all", f"README row {name} does not say it refuses {mode}"
        if modes == "all":
            assert not spec.refuses, name


def test_the_table_check_fails_on_a_row_that_drifts(monkeypatch, tmp_path):
    """The check itself: a README whose apollo row lost --rank, or whose soap row dropped its --fsdp refusal."""
    text = README.read_text()
    apollo_row = next(line for line in text.splitlines() if line.startswith("| `apollo` "))
    soap_row = next(line for line in text.splitlines() if line.startswith("| `soap` "))
    drifted = tmp_path / "README.md"
    drifted.write_text(text.replace(apollo_row, apollo_row.replace("--rank ", ""))
                       .replace(soap_row, soap_row.replace("no `--fsdp`, ", "")))
    monkeypatch.setattr(sys.modules[__name__], "README", drifted)
    rows = optimizer_rows()
    assert "rank" not in row_flags(rows, "apollo") and "rank" not in row_flags(rows, "apollo_mini")
    assert "--fsdp" not in rows["soap"][4]
