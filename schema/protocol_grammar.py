"""The grammar of a protocol criterion's ``where``, parsed into a tree of typed nodes (see schema.protocol).

A member site evaluates a protocol written by someone else, so a criterion is *parsed* and never
evaluated as code: no ``eval``, no ``DataFrame.query``, no formula engine. The grammar::

    expr   := term ('or' term)*
    term   := factor ('and' factor)*
    factor := 'not' factor | '(' expr ')' | test
    test   := column ('<'|'<='|'>'|'>='|'=='|'!=') literal
            | column 'between' literal 'and' literal          (both ends included)
            | column ['not'] 'in' '[' literal (',' literal)* ']'
            | column 'is' ['not'] 'missing'
    column := name | `any text in backticks`
    literal:= number | 'text' | "text" | true | false

>>> parse_condition("age >= 18 and sex in ['F']", criterion="adult").kind
'and'
"""

from __future__ import annotations

import keyword
import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from schema.errors import UserError

Literal_ = float | int | str | bool
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<string>'[^'\\\n]*'|"[^"\\\n]*")
    | (?P<backtick>`[^`\n]+`)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op><=|>=|==|!=|<|>)
    | (?P<punct>[()\[\],])
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "is", "missing", "between", "true", "false"}
_GRAMMAR = (
    "write comparisons (<, <=, >, >=, ==, !=), 'x between a and b', 'x in [..]', 'x is missing', joined with and/or/not"
)


class ProtocolError(UserError):
    """``protocol.yaml`` is missing, malformed or breaks the grammar; the message names the criterion."""


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Compare(_Node):
    kind: Literal["compare"] = "compare"
    column: str
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    value: Literal_


class Between(_Node):
    kind: Literal["between"] = "between"
    column: str
    low: float
    high: float


class InList(_Node):
    kind: Literal["in"] = "in"
    column: str
    values: list[Literal_] = Field(min_length=1)
    negate: bool = False


class Missing(_Node):
    kind: Literal["missing"] = "missing"
    column: str
    negate: bool = False


class AllOf(_Node):
    kind: Literal["and"] = "and"
    items: list[Node] = Field(min_length=2)


class AnyOf(_Node):
    kind: Literal["or"] = "or"
    items: list[Node] = Field(min_length=2)


class Not(_Node):
    kind: Literal["not"] = "not"
    item: Node


Node = Annotated[Union[Compare, Between, InList, Missing, AllOf, AnyOf, Not], Field(discriminator="kind")]  # noqa: UP007
Leaf = Compare | Between | InList | Missing
for _model in (AllOf, AnyOf, Not):
    _model.model_rebuild()


def level_text(value: object) -> str:
    """The text a level is compared as, the same for a declared level, a literal and an obs value
    (YAML reads ``yes`` as a boolean and ``1`` as a number; a level ``1`` and a value ``1.0`` agree)."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):  # numpy's bool too
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def leaves(node: Node) -> list[Leaf]:
    """The tests of a condition tree, left to right."""
    if isinstance(node, AllOf | AnyOf):
        return [leaf for item in node.items for leaf in leaves(item)]
    if isinstance(node, Not):
        return leaves(node.item)
    return [node]


class _Parser:
    """Recursive descent over the tokens of one ``where``; builds nodes, runs nothing."""

    def __init__(self, text: str, criterion: str) -> None:
        self.text, self.criterion = text, criterion
        self.tokens = self._tokenize(text)
        self.at = 0

    def fail(self, problem: str) -> ProtocolError:
        return ProtocolError(f"protocol criterion {self.criterion!r}: {problem} in {self.text!r}; {_GRAMMAR}")

    def _tokenize(self, text: str) -> list[tuple[str, str]]:
        tokens, position = [], 0
        while position < len(text.rstrip()):
            match = _TOKEN.match(text, position)
            if not match or match.end() == position:
                char = text[position:].lstrip()[:1]
                hint = {
                    ".": "attribute access ('.') is not part of the grammar",
                    "=": "assignment ('=') is not part of the grammar (compare with '==')",
                }.get(char, f"{char!r} is not part of the grammar")
                raise self.fail(hint)
            kind = match.lastgroup
            value = match.group(kind)
            if kind in ("name", "backtick"):
                name = value.strip("`")
                if name.startswith("__") or "__" in name and kind == "name":
                    raise self.fail(f"dunder names ({name!r}) are refused")
                if kind == "name" and name not in _KEYWORDS and (keyword.iskeyword(name) or name in ("None",)):
                    raise self.fail(f"Python code ({name!r}) is not part of the grammar")
                if kind == "name" and name in _KEYWORDS:
                    kind = "keyword"
                value = name
            tokens.append((kind, value))
            position = match.end()
        return tokens

    def peek(self, offset: int = 0) -> tuple[str, str]:
        index = self.at + offset
        return self.tokens[index] if index < len(self.tokens) else ("end", "")

    def take(self, kind: str, value: str | None = None) -> str:
        got = self.peek()
        if got[0] != kind or (value is not None and got[1] != value):
            wanted = value or kind
            raise self.fail(f"expected {wanted!r} but found {got[1] or 'the end'!r}")
        self.at += 1
        return got[1]

    def parse(self) -> Node:
        if not self.tokens:
            raise self.fail("the condition is empty")
        node = self.expr()
        if self.peek()[0] != "end":
            raise self.fail(f"unexpected {self.peek()[1]!r}")
        return node

    def expr(self) -> Node:
        items = [self.term()]
        while self.peek() == ("keyword", "or"):
            self.at += 1
            items.append(self.term())
        return items[0] if len(items) == 1 else AnyOf(items=items)

    def term(self) -> Node:
        items = [self.factor()]
        while self.peek() == ("keyword", "and"):
            self.at += 1
            items.append(self.factor())
        return items[0] if len(items) == 1 else AllOf(items=items)

    def factor(self) -> Node:
        if self.peek() == ("keyword", "not"):
            self.at += 1
            return Not(item=self.factor())
        if self.peek() == ("punct", "("):
            self.at += 1
            node = self.expr()
            self.take("punct", ")")
            return node
        return self.test()

    def test(self) -> Node:
        kind, column = self.peek()
        if kind not in ("name", "backtick"):
            raise self.fail(f"expected a column name but found {column or 'the end'!r}")
        self.at += 1
        if self.peek() == ("punct", "("):
            raise self.fail(f"function calls ({column}(...)) are not part of the grammar")
        kind, word = self.peek()
        self.at += 1
        if kind == "op":
            return Compare(column=column, op=word, value=self.literal())
        if (kind, word) == ("keyword", "between"):
            low = self.number()
            self.take("keyword", "and")
            return Between(column=column, low=low, high=self.number())
        negate = (kind, word) == ("keyword", "not")
        if negate:
            kind, word = self.peek()
            self.at += 1
        if (kind, word) == ("keyword", "in"):
            self.take("punct", "[")
            values = [self.literal()]
            while self.peek() == ("punct", ","):
                self.at += 1
                values.append(self.literal())
            self.take("punct", "]")
            return InList(column=column, values=values, negate=negate)
        if (kind, word) == ("keyword", "is") and not negate:
            negate = self.peek() == ("keyword", "not")
            self.at += negate
            self.take("keyword", "missing")
            return Missing(column=column, negate=negate)
        raise self.fail(f"after column {column!r} expected a comparison, 'between', 'in' or 'is', found {word!r}")

    def literal(self) -> Literal_:
        kind, value = self.peek()
        self.at += 1
        if kind == "number":
            number = float(value)
            return int(number) if number.is_integer() and re.fullmatch(r"-?\d+", value) else number
        if kind == "string":
            return value[1:-1]
        if kind == "keyword" and value in ("true", "false"):
            return value == "true"
        if kind == "name":
            raise self.fail(f"a value must be a number or quoted text: write '{value}' in quotes, not a name")
        raise self.fail(f"expected a value but found {value or 'the end'!r}")

    def number(self) -> float:
        value = self.literal()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"'between' needs numbers, found {value!r}")
        return float(value)


def parse_condition(text: str, *, criterion: str) -> Node:
    """Parse one criterion's ``where`` into a tree of nodes; raise :class:`ProtocolError` naming it.

    >>> parse_condition("ecog in [0, 1]", criterion="fit").values
    [0, 1]
    >>> parse_condition("__import__('os')", criterion="x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    schema.protocol_grammar.ProtocolError: protocol criterion 'x': dunder names ('__import__') are refused...
    """
    return _Parser(text, criterion).parse()
