"""Admission: slots taken in order of arrival up to the limit, given back as answers go out."""

from __future__ import annotations

from mab_service.config import Settings
from mab_service.http.admission import Admission


def test_requests_are_admitted_in_order_of_arrival_up_to_the_limit() -> None:
    admission = Admission(limit=2, retry_after_s=1)
    assert [admission.arrive() for _ in range(3)] == [True, True, False]
    assert admission.held == 2
    # An answered request gives its slot back at once: the next arrival is admitted, the one after is not.
    admission.leave()
    assert admission.arrive() is True
    assert admission.arrive() is False
    admission.leave()
    admission.leave()
    assert admission.held == 0 and admission.arrive() is True


def test_admission_comes_from_the_settings() -> None:
    admission = Admission.from_settings(Settings(max_in_flight=7, retry_after_s=3), frozenset({"/health"}))
    assert (admission.limit, admission.retry_after_s, admission.probes) == (7, 3, frozenset({"/health"}))
    assert admission.held == 0 and admission.draining is False
