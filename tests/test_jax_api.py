"""Our jax entry points exist, and take the keywords we pass, in jax 0.10.2 (installed) and 0.11.2 (GPU machine).

jax 0.11.2 needs Python 3.12, so it is checked statically from its source: the committed
fixture ``fixtures/jax_api/jax-0.11.2.json`` holds, for every jax name our code uses, what
``scripts/check_jax_api.py --source jax-0.11.2-py3-none-any.whl --write ...`` resolved it
to in that wheel. The installed jax is checked both ways: statically, and by importing it,
so the static resolver is itself tested against the real thing.
"""

import functools
import importlib
import importlib.util
import inspect
import json
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "jax_api" / "jax-0.11.2.json"


@functools.cache
def _checker():
    spec = importlib.util.spec_from_file_location("check_jax_api", REPO / "scripts" / "check_jax_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _used() -> dict:
    return _checker().references()


def _runtime(name: str):
    """Import and getattr along ``name`` as a user's code would."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return functools.reduce(getattr, parts[i:], obj)
    raise ImportError(name)


def test_references_cover_the_entry_points_that_differ_between_releases():
    used = _used()
    assert "mask" in used["jax.nn.dot_product_attention"]
    assert {"mesh", "in_specs", "out_specs", "check_vma"} <= used["jax.shard_map"]
    assert {"num_warps", "num_stages"} <= used["jax.experimental.pallas.triton.CompilerParams"]
    assert "stride" in used["jax.experimental.pallas.ds"]
    assert {"jax.memory.Space.Host", "jax.memory.Space.Device", "jax.sharding.AxisType.Auto"} <= set(used)


def test_installed_jax_defines_every_name_we_use():
    checker = _checker()
    source = checker.Source(Path(jax.__file__).parent.parent)
    assert checker.check(source, _used()) == []


def test_static_answers_match_the_imported_installed_jax():
    checker = _checker()
    source = checker.Source(Path(jax.__file__).parent.parent)
    for name, keywords in _used().items():
        obj = _runtime(name)  # raises if the static resolver said "defined" wrongly
        entry = source.resolve(name)
        if keywords and entry.params is not None and not entry.varkw:
            try:
                signature = inspect.signature(obj)
            except ValueError:  # a compiled (nanobind) class: the static answer is all there is
                continue
            signature.bind_partial(**dict.fromkeys(keywords))


def test_jax_0_11_2_defines_every_name_we_use():
    recorded = json.loads(FIXTURE.read_text())
    assert recorded["jax"] == "0.11.2"
    missing = sorted(set(_used()) - set(recorded["entries"]))
    assert not missing, (f"our code uses jax names the 0.11.2 fixture has not resolved: {missing}; rerun "
                         "scripts/check_jax_api.py --source jax-0.11.2-py3-none-any.whl --write " + str(FIXTURE))
    assert _checker().check(recorded["entries"], _used()) == []


@pytest.mark.parametrize("where", ["installed", "0.11.2"])
def test_checker_reports_a_missing_name_and_a_refused_keyword(where):
    checker = _checker()
    source = (checker.Source(Path(jax.__file__).parent.parent) if where == "installed"
              else json.loads(FIXTURE.read_text())["entries"] | {"jax.no_such_function": None})
    problems = checker.check(source, {"jax.nn.dot_product_attention": {"implementation", "flash"},
                                      "jax.no_such_function": set()})
    assert problems == ["jax.nn.dot_product_attention: does not take flash", "jax.no_such_function: not defined"]


def test_type_parameters_are_stripped_for_python_3_11():
    source = "def shard_map[F: Callable[..., int]](f: F, /, *, mesh=None) -> F: ...\ntype Specs[T] = tuple[T]\n"
    assert _checker().strip_type_params(source) == "def shard_map(f: F, /, *, mesh=None) -> F: ...\nSpecs = tuple[T]\n"
