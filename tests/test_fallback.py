"""FormFallback: a preferred kernel form that raises for a launch key gives way to the plain form, for good."""

import logging

from attncompiler.codegen.fallback import FormFallback
from attncompiler.failures import failure_text


def test_a_failing_form_is_logged_once_and_not_tried_again(caplog):
    forms = FormFallback("using the plain form")
    tried = []

    def preferred():
        tried.append("preferred")
        raise RuntimeError("does not compile\nsecond line")

    with caplog.at_level(logging.WARNING, logger="attncompiler"):
        first = forms.run(("k", 1), preferred, lambda: "plain", "the preferred form of %s", "k")
        again = forms.run(("k", 1), preferred, lambda: "plain", "the preferred form of %s", "k")
    assert (first, again) == ("plain", "plain") and tried == ["preferred"]
    assert forms.failed == {("k", 1)}
    (record,) = caplog.records
    assert record.getMessage() == ("attncompiler: the preferred form of k failed (RuntimeError: does not compile); "
                                   "using the plain form")


def test_a_working_form_runs_and_other_keys_keep_their_own_record():
    forms = FormFallback("using the plain form")
    forms.failed.add("broken")
    assert forms.run("fine", lambda: "preferred", lambda: "plain", "x") == "preferred"
    assert forms.run("broken", lambda: "preferred", lambda: "plain", "x") == "plain"
    assert forms.failed == {"broken"}


def test_a_failure_reads_as_its_type_and_first_line():
    assert failure_text(RuntimeError("out of resources\nat line 3")) == "RuntimeError: out of resources"
    assert failure_text(ValueError()) == failure_text(ValueError("\n")) == "ValueError"
