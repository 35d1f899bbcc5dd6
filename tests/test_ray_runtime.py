"""ray_runtime.ordered_actor_map on an embedded Ray: results in input order whatever the actors'
speed, input read lazily with a bounded number of items in flight, a library error raised in an
actor surfaces as itself."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from llmpipe.config.data import CurationSection  # noqa: E402
from llmpipe.curation.ray_runtime import library_errors, ordered_actor_map, ray_session  # noqa: E402


class _Slow:
    """Squares a number after a delay that depends on it, so actors finish out of order."""

    def __init__(self, fail_on: int):
        self.fail_on = fail_on

    def __call__(self, x: int) -> int:
        import time

        if x == self.fail_on:
            raise KeyError(f"bad item {x}")
        time.sleep(0.05 * ((x * 7) % 3))
        return x * x


@pytest.fixture(scope="module")
def session():
    cfg = CurationSection.model_validate({"engine": "ray", "ray_address": None, "num_cpus": 2, "batch_size": 8,
                                          "workers": 2, "shards": 1})
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    with ray_session(cfg) as where:
        yield where


def test_results_come_back_in_input_order_with_bounded_read_ahead(session):
    pulled = 0

    def items():
        nonlocal pulled
        for x in range(40):
            pulled += 1
            yield x

    out, ahead = [], []
    for y in ordered_actor_map(_Slow, (-1,), items(), workers=2, max_in_flight=3):
        out.append(y)
        ahead.append(pulled - len(out))
    assert out == [x * x for x in range(40)]
    assert max(ahead) <= 3, ahead


def test_an_error_in_an_actor_surfaces_as_the_library_error(session):
    with pytest.raises(KeyError, match="bad item 5"), library_errors(KeyError):
        list(ordered_actor_map(_Slow, (5,), range(10), workers=2))
