import os

import pytest

from recipes.onednn import DEFAULT_PRIMITIVE_CACHE_CAPACITY, PRIMITIVE_CACHE_VARIABLE, bound_primitive_cache


def test_the_primitive_cache_gets_the_default_bound_when_the_environment_sets_none(monkeypatch):
    monkeypatch.delenv(PRIMITIVE_CACHE_VARIABLE, raising=False)
    assert bound_primitive_cache() == DEFAULT_PRIMITIVE_CACHE_CAPACITY == 64
    assert os.environ[PRIMITIVE_CACHE_VARIABLE] == "64"


def test_a_capacity_the_user_exported_is_kept(monkeypatch):
    monkeypatch.setenv(PRIMITIVE_CACHE_VARIABLE, "1024")
    assert bound_primitive_cache() == 1024


def test_a_capacity_that_is_not_a_number_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(PRIMITIVE_CACHE_VARIABLE, "lots")
    with pytest.raises(ValueError, match="ONEDNN_PRIMITIVE_CACHE_CAPACITY='lots'"):
        bound_primitive_cache()
