"""Design matrices: declared levels, identical columns at every member, refused formulas, rank."""

import numpy as np
import pandas as pd
import pytest

from omics.design import DesignError, DesignSpec, check_design_rank, default_formula, design_matrix, validate_spec
from omics.errors import ContractError

LEVELS = {"sex": ("F", "M"), "batch": ("b1", "b2", "b3")}
SPEC = DesignSpec("~ endpoint + age + sex + batch", numeric=("age",), categorical=LEVELS)


def member_obs(sex, batch, age=None, prefix="s"):
    n = len(sex)
    age = np.arange(40.0, 40.0 + n) if age is None else age
    return pd.DataFrame({"age": age, "sex": sex, "batch": batch}, index=[f"{prefix}{i}" for i in range(n)])


def spec(formula, **kw):
    return DesignSpec(formula, **{"numeric": ("age",), "categorical": LEVELS, **kw})


def test_members_holding_different_levels_get_the_same_columns():
    a = member_obs(["F", "F", "M"], ["b1", "b1", "b1"], prefix="a")
    b = member_obs(["F", "F"], ["b3", "b2"], prefix="b")
    Xa, ca = design_matrix(a, np.array([1.0, 0.0, 1.0]), spec=SPEC, path="a.h5ad")
    Xb, cb = design_matrix(b, np.array([0.0, 1.0]), spec=SPEC, path="b.h5ad")
    assert ca == cb == ["endpoint", "age", "sex[M]", "batch[b2]", "batch[b3]"]
    assert Xa.dtype == Xb.dtype == np.float64
    np.testing.assert_array_equal(Xa, [[1, 40, 0, 0, 0], [0, 41, 0, 0, 0], [1, 42, 1, 0, 0]])
    np.testing.assert_array_equal(Xb, [[0, 40, 0, 0, 1], [1, 41, 0, 1, 0]])


def test_numeric_covariate_values_are_exact():
    age = np.array([0.1, 1e-9, 123456.789, -3.5])
    X, columns = design_matrix(member_obs(["F"] * 4, ["b1"] * 4, age=age), np.zeros(4), spec=SPEC)
    assert X[:, columns.index("age")].tolist() == age.tolist()


def test_integer_coded_levels_match_levels_declared_as_text():
    obs = pd.DataFrame({"site": [1.0, 2.0, 2.0]}, index=["a", "b", "c"])
    X, columns = design_matrix(
        obs, np.array([1.0, 0.0, 1.0]), spec=DesignSpec("~ endpoint + site", categorical={"site": ("1", "2")})
    )
    assert columns == ["endpoint", "site[2]"]
    np.testing.assert_array_equal(X[:, 1], [0, 1, 1])


def test_survival_leaves_out_every_column_with_the_endpoint():
    obs = member_obs(["F", "M", "F"], ["b1", "b2", "b3"])
    X, columns = design_matrix(obs, None, spec=spec("~ endpoint * sex + age + batch"))
    assert columns == ["sex[M]", "age", "batch[b2]", "batch[b3]"]
    np.testing.assert_array_equal(X[:, 0], [0, 1, 0])
    X, columns = design_matrix(obs, None, spec=spec("~ endpoint"))
    assert X.shape == (3, 0) and columns == []


def test_interaction_terms_with_the_endpoint():
    obs = member_obs(["F", "M", "M"], ["b1", "b2", "b1"])
    y = np.array([1.0, 1.0, 0.0])
    X, columns = design_matrix(obs, y, spec=spec("~ endpoint * sex + age"))
    assert columns == ["endpoint", "sex[M]", "age", "endpoint:sex[M]"]
    np.testing.assert_array_equal(X[:, 3], [0, 1, 0])
    X, columns = design_matrix(obs, y, spec=spec("~ endpoint + endpoint:batch"))
    assert columns == ["endpoint", "endpoint:batch[b2]", "endpoint:batch[b3]"]
    np.testing.assert_array_equal(X[:, 1], [0, 1, 0])


def test_region_interactions_for_every_region_but_the_reference():
    obs = member_obs(["F", "M", "F"], ["b1", "b1", "b2"])
    y = np.array([1.0, 0.0, 1.0])
    regional = spec("~ endpoint + age", regions=("EU", "US", "ASIA"))
    X, columns = design_matrix(obs, y, spec=regional, region="US")
    assert columns == ["endpoint", "age", "endpoint:region[US]", "endpoint:region[ASIA]"]
    np.testing.assert_array_equal(X[:, 2:], [[1, 0], [0, 0], [1, 0]])
    X, columns_eu = design_matrix(obs, y, spec=regional, region="EU")
    assert columns_eu == columns and not X[:, 2:].any()
    assert design_matrix(obs, None, spec=regional, region="US")[1] == ["age"]
    with pytest.raises(DesignError, match=r"region.*'MARS'.*declared regions"):
        design_matrix(obs, y, spec=regional, region="MARS")
    with pytest.raises(DesignError, match=r"subgroups by region .* region is None"):
        design_matrix(obs, y, spec=regional)


def test_default_formula_lists_covariates_in_declaration_order():
    assert (
        default_formula(["age", "bmi"], {"sex": ("F", "M"), "batch": ("b1",)}) == "~ endpoint + age + bmi + sex + batch"
    )
    assert default_formula([], {}) == "~ endpoint"
    validate_spec(DesignSpec(default_formula(["age"], LEVELS), numeric=("age",), categorical=LEVELS))


@pytest.mark.parametrize(
    ("formula", "match"),
    [
        ("~ endpoint + (age", r"m\.h5ad: statistics\.formula: formula '~ endpoint \+ \(age' cannot be parsed"),
        ("~ endpoint + age +", r"cannot be parsed: Operator `\+`"),
        ("~ endpoint + bmi", r"names column 'bmi', which is declared neither in statistics\.covariates.*declare 'bmi'"),
        ("~ 0 + endpoint + age", r"has no intercept.*member effects.*fix: drop the '0 \+' or '- 1'"),
        ("~ endpoint + age - 1", r"has no intercept"),
        ("~ age + sex", r"has no term 'endpoint'.*fix: add 'endpoint \+'"),
        ("~ endpoint + np.log(age)", r"holds '\.' at position 15; only column names"),
        ("~ endpoint + C(sex)", r"calls 'C\(\.\.\.\)'; function calls are not allowed"),
        ("~ endpoint + age**2", r"uses powers"),
        ("~ endpoint + I(age + 1)", r"calls 'I\(\.\.\.\)'"),
        ("~ endpoint + 2", r"the number 2"),
        ("y ~ endpoint", r"has a left-hand side"),
        ("~ endpoint + `age`", r"holds '`'"),
        ("~ endpoint | sex", r"holds '\|'"),
    ],
)
def test_formula_errors(formula, match):
    obs = member_obs(["F", "M"], ["b1", "b2"])
    with pytest.raises(DesignError, match=match) as info:
        design_matrix(obs, np.array([0.0, 1.0]), spec=spec(formula), path="m.h5ad")
    assert isinstance(info.value, ContractError) and info.value.field == "statistics.formula"


@pytest.mark.parametrize(
    "formula",
    [
        "~ endpoint + __import__('os').system('touch {target}')",
        "~ endpoint + {{__import__('os').system('touch {target}')}}",
        "~ endpoint + eval(\"__import__('os').system('touch {target}')\")",
        "~ endpoint + age:__import__('os').system('touch {target}')",
    ],
)
def test_a_formula_that_would_run_code_is_refused_and_nothing_runs(tmp_path, formula):
    target = tmp_path / "pwned"
    text = formula.format(target=target)
    obs = member_obs(["F", "M"], ["b1", "b2"])
    with pytest.raises(DesignError, match=r"statistics\.formula: .*(function calls are not allowed|holds '\{')"):
        design_matrix(obs, np.array([0.0, 1.0]), spec=spec(text))
    with pytest.raises(DesignError):
        validate_spec(spec(text))
    assert not target.exists()


def test_missing_obs_column():
    obs = member_obs(["F", "M"], ["b1", "b2"]).drop(columns="batch")
    with pytest.raises(DesignError, match=r"m\.h5ad: obs\.batch: the design needs column 'batch' in obs; found: \[age"):
        design_matrix(obs, np.array([0.0, 1.0]), spec=SPEC, path="m.h5ad")


def test_non_numeric_and_non_finite_numeric_covariates():
    obs = member_obs(["F"] * 4, ["b1"] * 4, age=["50", "old", "61", "n/a"])
    with pytest.raises(
        DesignError, match=r"obs\.age: .*2 non-numeric or non-finite values \(first: sample 's1', value 'old'"
    ):
        design_matrix(obs, np.zeros(4), spec=SPEC)
    obs = member_obs(["F"] * 3, ["b1"] * 3, age=[50.0, np.inf, 61.0])
    with pytest.raises(DesignError, match=r"1 non-numeric or non-finite values \(first: sample 's1', value inf\)"):
        design_matrix(obs, np.zeros(3), spec=SPEC)


def test_undeclared_categorical_values_are_named_with_the_declared_levels():
    obs = member_obs(["F", "M", "F"], ["b1", "b9", "b7"])
    with pytest.raises(
        DesignError,
        match=r"obs\.batch: categorical covariate 'batch' holds \['b7', 'b9'\] in 2 samples \(first: 's1'\), not among "
        r"the declared levels \['b1', 'b2', 'b3'\]; fix: declare the level\(s\) under statistics\.covariates\.batch",
    ):
        design_matrix(obs, np.zeros(3), spec=SPEC)


@pytest.mark.parametrize("column", ["age", "sex"])
def test_missing_covariate_values(column):
    obs = member_obs(["F", "M", "F"], ["b1", "b2", "b1"])
    obs[column] = obs[column].astype(object)
    obs.loc[["s1", "s2"], column] = np.nan
    with pytest.raises(
        DesignError, match=rf"obs\.{column}: covariate '{column}' is missing in 2 samples \(first: 's1'\); fix: fill"
    ):
        design_matrix(obs, np.zeros(3), spec=SPEC)


def test_missing_endpoint_values_and_inconsistent_declarations():
    obs = member_obs(["F", "M"], ["b1", "b2"])
    with pytest.raises(DesignError, match=r"endpoint is missing or not finite for 1 samples; fix: drop unlabelled"):
        design_matrix(obs, np.array([np.nan, 1.0]), spec=SPEC)
    with pytest.raises(DesignError, match=r"declared both numeric and categorical"):
        validate_spec(DesignSpec("~ endpoint + sex", numeric=("sex",), categorical={"sex": ("F", "M")}))
    with pytest.raises(DesignError, match=r"reserved name"):
        validate_spec(DesignSpec("~ endpoint", numeric=("endpoint",)))
    with pytest.raises(DesignError, match=r"statistics\.covariates\.sex: declared levels \['F', 'F'\]"):
        validate_spec(DesignSpec("~ endpoint + sex", categorical={"sex": ("F", "F")}))


def test_rank_check_finds_batch_confounded_with_member():
    # member a is all b1, member b all b2: batch[b2] is constant within each member, so member absorbs it
    blocks, columns = [], None
    for sex, batch, y in [(["F", "M", "F", "M"], ["b1"] * 4, [1, 0, 1, 0]), (["F", "F", "M"], ["b2"] * 3, [0, 1, 1])]:
        X, columns = design_matrix(
            member_obs(sex, batch, age=np.array([50.0, 41, 63, 58])[: len(sex)]), np.array(y, float), spec=SPEC
        )
        blocks.append(X)
    assert check_design_rank(blocks, columns=columns) == ["batch[b2]", "batch[b3]"]


def test_rank_check_accepts_a_full_rank_design_and_finds_aliased_columns():
    rng = np.random.default_rng(0)
    blocks = [rng.normal(size=(20, 3)) + i for i in range(3)]
    assert check_design_rank(blocks, columns=["a", "b", "c"]) == []
    aliased = [np.column_stack([b, b[:, 0] + 2 * b[:, 1]]) for b in blocks]  # d = a + 2b
    assert check_design_rank(aliased, columns=["a", "b", "c", "d"]) == ["d"]
    with pytest.raises(ValueError, match=r"design block 0 has shape \(20, 3\); expected \(n, 2\)"):
        check_design_rank(blocks, columns=["a", "b"])
