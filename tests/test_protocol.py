"""protocol.yaml: criteria parse into typed nodes; code, dunders, attribute access, calls, unknown columns
and unknown levels are refused with a message naming the criterion, and nothing is ever evaluated."""

from __future__ import annotations

import builtins

import pandas as pd
import pytest

from omics.feasibility import count_feasibility
from schema.errors import UserError
from schema.feasibility import Feasibility
from schema.protocol import Protocol, ProtocolError, load_protocol, protocol_from_text
from schema.protocol_grammar import AllOf, AnyOf, Between, Compare, InList, Missing, Not, parse_condition

PROTOCOL = """
name: nsclc-phase2
columns: {age: numeric, sex: [F, M], ecog: numeric, egfr: numeric, region: [EU, US], smoker: [yes, no]}
inclusion:
  - {name: adult, where: "age between 18 and 75"}
  - {name: fit, where: "ecog in [0, 1]"}
exclusion:
  - {name: renal, where: "egfr < 30 or egfr is missing"}
  - {name: male smoker, where: "not (sex != 'M' or smoker == true)"}
bands: {age: [40, 65]}
strata: [[age, sex], [region]]
"""


def _protocol(where: str, columns: dict | None = None) -> str:
    columns = columns or {"age": "numeric", "sex": ["F", "M"]}
    return f"columns: {columns}\ninclusion:\n  - name: c1\n    where: {where!r}\n"


def test_a_protocol_parses_into_a_tree_of_typed_nodes():
    protocol = protocol_from_text(PROTOCOL)
    assert [(kind, c.name) for kind, c in protocol.criteria] == [
        ("inclusion", "adult"),
        ("inclusion", "fit"),
        ("exclusion", "renal"),
        ("exclusion", "male smoker"),
    ]
    assert protocol.inclusion[0].condition == Between(column="age", low=18, high=75)
    assert protocol.inclusion[1].condition == InList(column="ecog", values=[0, 1])
    assert protocol.exclusion[0].condition == AnyOf(
        items=[Compare(column="egfr", op="<", value=30), Missing(column="egfr")]
    )
    smoker = protocol.exclusion[1].condition
    assert isinstance(smoker, Not) and isinstance(smoker.item, AnyOf)
    assert protocol.columns["smoker"] == ["true", "false"]  # YAML's yes/no, compared as text
    assert protocol.stratum_levels("age") == ["<40", "40 to <65", ">=65", "missing"]
    assert protocol.stratum_levels("region") == ["EU", "US", "missing"]


def test_precedence_and_binds_tighter_than_or_and_parentheses_group():
    tree = parse_condition("a > 1 or b < 2 and not c is not missing", criterion="x")
    assert isinstance(tree, AnyOf) and isinstance(tree.items[1], AllOf)
    assert tree.items[1].items[1] == Not(item=Missing(column="c", negate=True))
    grouped = parse_condition("(a > 1 or b < 2) and `odd col` not in ['x', \"y\"]", criterion="x")
    assert isinstance(grouped, AllOf) and grouped.items[1] == InList(column="odd col", values=["x", "y"], negate=True)
    assert parse_condition("a >= -2.5e1", criterion="x") == Compare(column="a", op=">=", value=-25.0)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("__import__('os').system('touch pwned') > 0", "dunder names \\('__import__'\\) are refused"),
        ("age.__class__ > 1", "attribute access"),
        ("sex.lower() == 'f'", "attribute access"),
        ("len(age) > 1", r"function calls \(len\(\.\.\.\)\)"),
        ("lambda: 1", r"Python code \('lambda'\)"),
        ("age > 1 if True else 0", r"Python code \('if'\)"),
        ("age = 3", "assignment"),
        ("age > 1; import os", "';' is not part of the grammar"),
        ("age + 1 > 2", "'\\+' is not part of the grammar"),
        ("`__dict__` > 1", "dunder names"),
        ("age > other", "a value must be a number or quoted text"),
        ("age >", "expected a value"),
        ("(age > 1", "expected"),
        ("age between 'a' and 3", "'between' needs numbers"),
    ],
)
def test_code_and_anything_outside_the_grammar_is_refused_naming_the_criterion(where, message):
    with pytest.raises(ProtocolError, match=message) as caught:
        protocol_from_text(_protocol(where), source="trial/protocol.yaml")
    assert "trial/protocol.yaml" in str(caught.value) and "criterion 'c1'" in str(caught.value)
    assert isinstance(caught.value, UserError) and caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("bmi > 30", "criterion 'c1' names column 'bmi', which is not declared under 'columns'"),
        ("sex == 'X'", "criterion 'c1' names level 'X' of column 'sex', which is not among its declared levels"),
        ("sex in ['F', 'Female']", "names level 'Female' of column 'sex'"),
        ("sex > 'F'", "column 'sex' is categorical"),
        ("age == 'old'", "column 'age' is numeric"),
    ],
)
def test_an_unknown_column_or_level_is_an_error_naming_it(where, message):
    with pytest.raises(ProtocolError, match=message):
        protocol_from_text(_protocol(where))


def test_protocol_level_checks():
    with pytest.raises(ProtocolError, match="criterion names \\['a'\\] repeat"):
        protocol_from_text("columns: {x: numeric}\ninclusion: [{name: a, where: x > 1}, {name: a, where: x < 5}]")
    with pytest.raises(ProtocolError, match="at least one criterion"):
        protocol_from_text("columns: {x: numeric}")
    with pytest.raises(ProtocolError, match="numeric column 'x' needs bands"):
        protocol_from_text("columns: {x: numeric}\ninclusion: [{name: a, where: x > 1}]\nstrata: [[x]]")
    with pytest.raises(ProtocolError, match="bands.x = \\[5.0, 1.0\\]: give one or more increasing"):
        protocol_from_text("columns: {x: numeric}\ninclusion: [{name: a, where: x > 1}]\nbands: {x: [5, 1]}")
    with pytest.raises(ProtocolError, match="inclusion.0.run: unknown key 'run'"):
        protocol_from_text("columns: {x: numeric}\ninclusion: [{name: a, where: x > 1, run: 'rm -rf'}]")


def test_yaml_python_tags_are_refused_by_the_safe_loader(tmp_path):
    path = tmp_path / "protocol.yaml"
    path.write_text("columns: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ProtocolError, match="not valid YAML"):
        load_protocol(path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ProtocolError, match="no such file"):
        load_protocol(tmp_path / "missing.yaml")


def test_nothing_is_evaluated_as_code(monkeypatch, tmp_path):
    """eval, exec, compile, pandas' query and eval are never called, for a good protocol or a hostile one."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"evaluated as code: {args[:1]}")

    obs = pd.DataFrame(
        {
            "age": [30.0, 50.0],
            "sex": ["F", "M"],
            "ecog": [0, 1],
            "egfr": [60.0, 40.0],
            "region": ["EU", "US"],
            "smoker": [True, False],
        }
    )
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patched:
        for target, name in ((builtins, "eval"), (builtins, "exec"), (builtins, "compile"), (pd, "eval")):
            patched.setattr(target, name, refuse)
        patched.setattr(pd.DataFrame, "query", refuse)
        patched.setattr(pd.DataFrame, "eval", refuse)
        protocol = protocol_from_text(PROTOCOL)
        counts = count_feasibility(obs, protocol)
        with pytest.raises(ProtocolError) as refused:
            protocol_from_text(_protocol("__import__('os').system('touch pwned') > 0"))
    assert counts[:5].tolist() == [2, 2, 2, 2, 1]
    assert "dunder" in str(refused.value)
    assert not (tmp_path / "pwned").exists()


def test_a_protocol_round_trips_through_its_dump():
    protocol = protocol_from_text(PROTOCOL)
    again = Protocol.model_validate(protocol.model_dump())
    assert again == protocol and again.exclusion[1].condition == protocol.exclusion[1].condition


def test_the_feasibility_settings_section():
    settings = Feasibility.model_validate({"noise_epsilon": 1.0, "screening_capacity": {"a": 10}, "target": 50})
    settings.check_members(["a", "b"])
    assert (settings.consent_rate, settings.rate_cv, settings.interval) == (1.0, 0.5, 0.9)
    with pytest.raises(ValueError, match="noise_epsilon"):
        Feasibility.model_validate({"noise_epsilon": 0})
    with pytest.raises(ValueError, match="consent_rate"):
        Feasibility.model_validate({"consent_rate": 1.5})
    with pytest.raises(ValueError, match="names \\['c'\\], which are not members"):
        Feasibility(screening_capacity={"c": 1}).check_members(["a"])
