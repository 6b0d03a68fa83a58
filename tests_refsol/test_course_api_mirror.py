"""The learner's package and the reference expose the same API, module by module."""

import importlib
import inspect
import pkgutil

import pytest

import tiny_llm_ref

REF_MODULES = sorted(m.name for m in pkgutil.iter_modules(tiny_llm_ref.__path__))


def _public(module) -> dict[str, object]:
    """Functions and classes a module defines itself (not what it imports)."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == module.__name__
    }


def _methods(cls) -> dict[str, str]:
    out = {}
    for name, obj in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__call__"):
            continue
        fn = obj.fget if isinstance(obj, property) else obj
        if isinstance(fn, staticmethod | classmethod):
            fn = fn.__func__
        if inspect.isfunction(fn):
            out[name] = ("property " if isinstance(obj, property) else "") + str(
                inspect.signature(fn)
            )
    return out


def test_there_are_modules_to_compare():
    assert REF_MODULES, "tiny_llm_ref has no modules"


@pytest.mark.parametrize("name", REF_MODULES)
def test_module_mirrors_reference(name):
    ref = importlib.import_module(f"tiny_llm_ref.{name}")
    try:
        learner = importlib.import_module(f"tiny_llm.{name}")
    except ModuleNotFoundError as e:
        pytest.fail(f"src/tiny_llm/{name}.py is missing (the reference has it): {e}")
    ref_api, learner_api = _public(ref), _public(learner)
    assert sorted(learner_api) == sorted(ref_api), f"public names differ in {name}.py"
    for attr, ref_obj in ref_api.items():
        obj = learner_api[attr]
        if inspect.isclass(ref_obj):
            assert _methods(obj) == _methods(ref_obj), f"{name}.{attr}: methods differ"
        else:
            assert str(inspect.signature(obj)) == str(inspect.signature(ref_obj)), (
                f"{name}.{attr}: signature differs"
            )


def test_package_exports_match():
    import tiny_llm

    ref = {n for n in dir(tiny_llm_ref) if not n.startswith("_")}
    learner = {n for n in dir(tiny_llm) if not n.startswith("_")}
    assert learner == ref, f"package-level names differ: {sorted(learner ^ ref)}"
