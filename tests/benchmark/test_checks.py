"""`benchmark.checks`: every configurable's values are checked, each bad one is one line naming its binding."""

import contextlib
import inspect
import io
import re

import gin
import pytest

import methods
from benchmark.checks import _LATER, FLAG, check, check_bindings, integer, number, one_of, optional, tuple_of
from benchmark.config import RULES as RUN_RULES
from benchmark.config import RunConfig
from benchmark.run import parse_config
from methods import MINI_BACKBONE, create_backbone, create_method, list_methods
from methods.adapters import ADAPTERS
from methods.base import RULES as METHOD_RULES
from methods.base import forward_features, inference_features
from methods.experts import hard_concrete
from methods.smat import teacher_reuses_query_pass
from registry.errors import DataError
from slurm.launch import check_config


@pytest.mark.parametrize("rule, good, bad", [
    (integer(1), [1, 8], [0, -1, 1.0, "8", True, None]),
    (number(0, 1, "[)"), [0, 0.5, 0.99], [1, 1.0, -0.1, "high", float("nan"), True]),
    (number(0, ends="(]"), [1e-9, 1e6], [0, 0.0, float("inf")]),
    (one_of("l0", "expected"), ["l0"], ["L0", None]),
    (FLAG, [True, False], [1, 0, "yes", None]),
    (optional(FLAG), [None, True], ["no"]),
    (tuple_of(number(0)), [(0.0, 1e-3), [1]], [(), (0.1, 0.1), (-1,), 0.1]),
])
def test_a_rule_accepts_its_range_and_nothing_else(rule, good, bad):
    assert all(rule.accepts(v) for v in good) and not any(rule.accepts(v) for v in bad)


def test_a_refused_value_is_one_line_naming_the_binding_and_what_to_give():
    with pytest.raises(DataError, match=r"^smat\.num_experts = 'x': give an integer >= 1$"):
        check("smat", dict(num_experts="x", other="unchecked"), dict(num_experts=integer(1), absent=integer(0)))


def _bindable(fn):
    """The parameters gin can bind: those with a default, but the backbone."""
    return {n for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty and n != "backbone"}


@pytest.mark.parametrize("name", list_methods())
def test_every_method_argument_has_a_range(name):
    cls = methods.method_class(name)
    own = vars(inspect.getmodule(cls)).get("RULES", {})
    assert _bindable(cls.__init__) - {"kwargs"} <= set(own) | set(METHOD_RULES)


LATER = dict(differentiable=forward_features, inference=inference_features, hard_concrete=hard_concrete,
             dense_teacher=teacher_reuses_query_pass, **{n: f for n, f in ADAPTERS.items() if n != "protonet"})


@pytest.mark.parametrize("name", sorted(LATER))
def test_every_gin_function_argument_has_a_range(name):
    assert set(LATER) == set(_LATER) and _bindable(LATER[name]) == set(_LATER[name])


def test_every_run_field_with_a_range_has_one():
    unchecked = {"method", "benchmark", "records_root", "decoded_cache", "backbone", "weights_file"}  # named, checked when built
    assert set(RunConfig.__dataclass_fields__) == set(RUN_RULES) | unchecked


@pytest.mark.parametrize("binding, message", [
    ("smat.num_experts = 'x'", "smat.num_experts = 'x': give an integer >= 1"),
    ("smat.num_experts = 0", "smat.num_experts = 0: give an integer >= 1"),
    ("smat.target_sparsity = 'high'", "smat.target_sparsity = 'high': give a number in [0, 1)"),
    ("smat.tasks_per_step = 0", "smat.tasks_per_step = 0: give an integer >= 1"),
    ("smat.sparsity_measure = 'L0'", "smat.sparsity_measure = 'L0': give 'l0' or 'expected'"),
    ("pmf.momentum = 1.5", "pmf.momentum = 1.5: give a number in [0, 1)"),
    ("softmerge.num_experts = 2.5", "softmerge.num_experts = 2.5: give an integer >= 1"),
    ("pre.tasks_per_step = -1", "pre.tasks_per_step = -1: give an integer >= 1"),
])
def test_a_method_refuses_a_bad_binding_when_built(binding, message):
    gin.parse_config([binding])
    name = binding.split(".")[0]
    with pytest.raises(DataError, match=re.escape(message)):
        create_method(name, backbone=create_backbone(MINI_BACKBONE, pretrained=False))


@pytest.mark.parametrize("binding, message", [
    ("full.steps = -1", "full.steps = -1: give an integer >= 0"),
    ("lora.rank = 0", "lora.rank = 0: give an integer >= 1"),
    ("gradient_free.accept_probability = 2", "gradient_free.accept_probability = 2: give a number in [0, 1]"),
    ("full_joint.steps = 'many'", "full_joint.steps = 'many': give an integer >= 0"),
    ("inference.compile_backbone = 'no'", "inference.compile_backbone = 'no': give True or False or None"),
])
def test_bindings_of_functions_a_run_calls_later_are_checked_up_front(binding, message):
    gin.parse_config([binding])
    with pytest.raises(DataError) as info:
        check_bindings()
    assert str(info.value) == message


@pytest.mark.parametrize("gin_file, binding, says", [
    ("methods/smat.gin", "smat.num_experts = 0", "smat.num_experts = 0: give an integer >= 1"),
    ("methods/smat.gin", "smat.tasks_per_step = 0", "smat.tasks_per_step = 0: give an integer >= 1"),
    ("methods/pmf.gin", "pmf.momentum = 1.5", "pmf.momentum = 1.5: give a number in [0, 1)"),
])
def test_a_method_value_is_refused_when_the_config_is_parsed_so_slurm_refuses_it_before_submitting(gin_file, binding,
                                                                                                     says):
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(DataError) as refused:
        parse_config([gin_file], [binding])
    assert str(refused.value) == says
    with pytest.raises(DataError, match=re.escape(says)):
        check_config([gin_file], [binding])
