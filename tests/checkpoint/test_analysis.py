from __future__ import annotations

import pytest

from cellnode.checkpoint.analysis import CellAnalysis, analyze_cell, transform_cell
from cellnode.exceptions import InvalidArgument

RANDOMIZER_CELL = """\
from random import randint
from random import seed

seed()

def generate_value(input_data):
    return dict(generated_value=randint(
        input_data["left_bound"],
        input_data["right_bound"]
    ))

output_data = generate_value(input_data)
print(output_data)
"""


def test_randomizer_cell() -> None:
    analysis = analyze_cell(RANDOMIZER_CELL)
    assert analysis.reads == {"input_data"}
    assert analysis.assigns >= {"randint", "seed", "generate_value", "output_data"}
    assert analysis.is_complete
    assert not analysis.uses_ipython


def test_result_is_frozen() -> None:
    analysis = analyze_cell("x = 1")
    assert analysis == CellAnalysis(reads=frozenset(), assigns=frozenset({"x"}), is_complete=True, uses_ipython=False)
    with pytest.raises(AttributeError):
        analysis.reads = frozenset()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("source", "reads", "assigns"),
    [
        ("y = x + 1", {"x"}, {"y"}),
        ("x = 1\ny = x", set(), {"x", "y"}),
        ("x = x + 1", {"x"}, {"x"}),
        ("total += step", {"total", "step"}, {"total"}),
        ("a, (b, *c) = pair\nd = a + b", {"pair"}, {"a", "b", "c", "d"}),
        ("obj.attr = value\nitems[key] = 1", {"obj", "value", "items", "key"}, set()),
        ("n: int = size\nm: Shape", {"size", "Shape"}, {"n"}),
        ("if (n := len(items)) > 3:\n    pass\nprint(n)", {"items"}, {"n"}),
        ("import os.path\nimport numpy as np\nfrom json import dumps as d\nos, np, d", set(), {"os", "np", "d"}),
        ("print(len(range(3)), __name__)", set(), set()),
        ("display(frame)\nget_ipython()", {"frame"}, set()),
        ("del x", set(), set()),
        ("with open(p) as fh:\n    text = fh.read()", {"p"}, {"fh", "text"}),
    ],
)
def test_module_level_reads_and_assigns(source: str, reads: set[str], assigns: set[str]) -> None:
    analysis = analyze_cell(source)
    assert analysis.reads == reads
    assert analysis.assigns == assigns


def test_branches_bind_for_what_follows() -> None:
    analysis = analyze_cell("if flag:\n    x = 1\nelse:\n    y = x\nprint(x, y)")
    assert analysis.reads == {"flag", "x"}  # the else branch cannot see the if branch
    assert analysis.assigns == {"x", "y"}


def test_try_handlers_see_the_body() -> None:
    source = (
        "try:\n    import ujson as json\nexcept ImportError as exc:\n    json = None\n    print(exc)\n"
        "finally:\n    done = json\n"
    )
    analysis = analyze_cell(source)
    assert analysis.reads == set()
    assert analysis.assigns == {"json", "exc", "done"}


def test_loops_see_their_own_bindings() -> None:
    source = (
        "for i in range(n):\n    if i:\n        print(previous)\n    previous = i\nwhile not done:\n    done = True\n"
    )
    analysis = analyze_cell(source)
    assert analysis.reads == {"n", "done"}  # `done` is tested before the body first binds it
    assert analysis.assigns == {"i", "previous", "done"}


def test_match_binds_capture_patterns() -> None:
    source = "match command:\n    case [first, *rest]:\n        pass\n    case {'k': value, **other}:\n        pass\n"
    analysis = analyze_cell(source + "print(first, rest, value, other)")
    assert analysis.reads == {"command"}
    assert analysis.assigns == {"first", "rest", "value", "other"}


def test_functions_reading_globals() -> None:
    source = (
        "def f(a, b=default, *args, c: Hint = 1, **kw) -> Result:\n"
        "    local = a + g + missing\n    return local\ng = 2\n"
    )
    analysis = analyze_cell(source)
    # `g` is bound later in the cell, so the function finds it when called; `missing` comes from outside.
    assert analysis.reads == {"default", "Hint", "Result", "missing"}
    assert analysis.assigns == {"f", "g"}


def test_lazy_annotations_are_not_reads() -> None:
    analysis = analyze_cell("from __future__ import annotations\ndef f(a: Hint) -> Result:\n    pass\nx: Later = 1")
    assert analysis.reads == set()


def test_global_declaration_assigns() -> None:
    analysis = analyze_cell("def setup():\n    global model\n    model = load()\nsetup()\nprint(model)")
    assert analysis.assigns == {"setup", "model"}
    assert analysis.reads == {"load"}


def test_nested_scopes() -> None:
    source = (
        "class Model(Base, metaclass=Meta):\n"
        "    scale = factor\n"
        "    def predict(self, x):\n"
        "        return x * self.scale + bias\n"
        "square = lambda v, w=weight: v * v + offset\n"
        "def outer():\n"
        "    inner_value = 1\n"
        "    def inner():\n"
        "        return inner_value + deep\n"
        "    return inner\n"
    )
    analysis = analyze_cell(source)
    assert analysis.reads == {"Base", "Meta", "factor", "bias", "weight", "offset", "deep"}
    assert analysis.assigns == {"Model", "square", "outer"}


def test_comprehension_variables_are_local() -> None:
    analysis = analyze_cell("squares = [x * k for x in data if x > limit]\npairs = {a: b for a, b in squares}")
    assert analysis.reads == {"data", "k", "limit"}
    assert analysis.assigns == {"squares", "pairs"}


def test_walrus_in_comprehension_binds_at_module_level() -> None:
    analysis = analyze_cell("values = [last := v for v in source]\nprint(last)")
    assert analysis.reads == {"source"}
    assert analysis.assigns == {"values", "last"}


@pytest.mark.parametrize(
    "source",
    ["from os.path import *", "exec('x = 1')", "y = eval(text)", "ns = globals()", "v = vars()", "l = locals()"],
)
def test_incomplete_analysis(source: str) -> None:
    assert not analyze_cell(source).is_complete


def test_star_import_in_a_loop_is_incomplete() -> None:
    assert not analyze_cell("for m in mods:\n    from os import *").is_complete


def test_vars_of_an_object_is_complete() -> None:
    analysis = analyze_cell("v = vars(obj)")
    assert analysis.is_complete
    assert analysis.reads == {"obj"}


def test_line_magic() -> None:
    assert transform_cell("%time y = 2") == "get_ipython().run_line_magic('time', 'y = 2')\n"
    analysis = analyze_cell("%time y = 2")
    assert analysis.uses_ipython
    assert analysis.assigns == {"y"}  # the code %time runs is analyzed in place
    assert analysis.reads == set()


def test_shell_escape_and_cell_magic() -> None:
    assert analyze_cell("files = !ls\nprint(files)").assigns == {"files"}
    analysis = analyze_cell("%%timeit\nz = w + 1\n")
    assert analysis.uses_ipython
    assert analysis.reads == set()


@pytest.mark.parametrize(
    ("source", "line", "fragment"),
    [
        ("x = 1\ny = (2,\n", 2, "'(' was never closed"),
        ("def f(:\n    pass", 1, "invalid syntax"),
        ("def f(a):\n    global a\n", 2, "name 'a' is parameter and global"),
    ],
)
def test_syntax_error(source: str, line: int, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        analyze_cell(source)
    message = str(info.value)
    assert message.startswith(f"The deployed cell has a syntax error at line {line}: ")
    assert fragment in message
    assert message.endswith(".")


@pytest.mark.parametrize(
    ("source", "reads", "assigns"),
    [
        ("obj.count += 1\nitems[0] -= step", {"obj", "items", "step"}, set()),
        ("del items[key]", {"items", "key"}, set()),
        ("async for row in stream():\n    last = row", {"stream"}, {"row", "last"}),
        ("try:\n    risky()\nexcept:\n    pass\nexcept (KeyError, Custom):\n    pass", {"risky", "Custom"}, set()),
        (
            "match value:\n    case [*_]:\n        pass\n    case {'a': 1}:\n        pass\n    case _:\n        pass",
            {"value"},
            set(),
        ),
        ("@decorator(option)\ndef f(*, a, b=default):\n    return a", {"decorator", "option", "default"}, {"f"}),
    ],
)
def test_less_common_statements(source: str, reads: set[str], assigns: set[str]) -> None:
    analysis = analyze_cell(source)
    assert analysis.reads == reads
    assert analysis.assigns == assigns


@pytest.mark.parametrize(
    ("source", "reads", "assigns"),
    [
        ("%time total = base + x", {"base", "x"}, {"total"}),
        ("%%time\ny = z * 2\nw = y", {"z"}, {"y", "w"}),
        ("%%capture out\nprint(v)\nu = v", {"v"}, {"u", "out"}),
        ("%%capture --no-stderr\nu = 1", set(), {"u"}),
        ("%%time\n%time q = p", {"p"}, {"q"}),
        ("%matplotlib inline\nr = 1", set(), {"r"}),
    ],
)
def test_code_running_magics_are_analyzed_in_place(source: str, reads: set[str], assigns: set[str]) -> None:
    analysis = analyze_cell(source)
    assert analysis.uses_ipython
    assert analysis.reads == reads
    assert assigns <= analysis.assigns
