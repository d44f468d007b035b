"""Fixtures for the deq tests."""

import pytest
from deq_problems import PROBLEMS, Problem


@pytest.fixture(params=PROBLEMS, ids=[p.__name__ for p in PROBLEMS])
def problem(request) -> Problem:
    return request.param()
