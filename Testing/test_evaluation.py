"""airreg.evaluation helpers that need no trained model: the gross-failure check."""

from __future__ import annotations

from types import SimpleNamespace

from airreg.errors import InputError
from airreg.evaluation import gross_failures


class ScriptedRegistrar:
    """Records what it is asked to register; warns on swapped inputs, refuses case 'c' as the TRUS; its patient
    check flags case 'b''s TRUS under case 'a''s MR."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def register(self, mr: str, trus: str) -> SimpleNamespace:
        self.calls.append((mr, trus))
        if trus == "trus-c":
            raise InputError("no overlap")
        flagged = (mr, trus) == ("mr-a", "trus-b")
        warned = mr.startswith("trus") or flagged
        return SimpleNamespace(
            after=SimpleNamespace(quality="warning" if warned else "ok", patient_flagged=flagged)
        )


def test_gross_failures_registers_swapped_inputs_and_the_next_patients_trus():
    cases = [SimpleNamespace(mr=f"mr-{k}", trus=f"trus-{k}") for k in "abc"]
    registrar = ScriptedRegistrar()
    counts = gross_failures(cases, registrar, progress=False)
    assert registrar.calls == [
        ("trus-a", "mr-a"),
        ("mr-a", "trus-b"),
        ("trus-b", "mr-b"),
        ("mr-b", "trus-c"),
        ("trus-c", "mr-c"),
        ("mr-c", "trus-a"),
    ]
    assert counts["swapped"] == {"warned": 3, "patient_check": 0, "errors": 0, "cases": 3}
    assert counts["other_patient"] == {"warned": 1, "patient_check": 1, "errors": 1, "cases": 3}
