"""A registrar stand-in that knows the answer, for tests of the module's workflow (no networks, no model).

``register`` returns the true transform and ``score`` rates an alignment by its distance from it, so tests can
assert exact geometry and that moving a transform by hand changes the score. The networks are tested elsewhere.
"""

from __future__ import annotations

import numpy as np

from airreg import data, geometry


class ExactRegistrar:
    """Registrar stand-in: ``register`` returns ``truth`` (MR world -> TRUS local, LPS); ``score`` says how far
    an alignment is from it (RMS over a few points, mm) as an estimated error and a D-score exp(-error / 5)."""

    def __init__(self, truth: np.ndarray, device: str = "cpu", on_progress=None) -> None:
        self.truth = np.asarray(truth, dtype=float)
        self.device = device
        self.on_progress = on_progress
        self.points = np.array([[0, 0, 0], [30, 0, 0], [0, 30, 0], [0, 0, 30]], dtype=float)

    def verdict(self, mr, trus, transform: np.ndarray):
        from airreg.quality import QualityResult

        error = float(np.sqrt(np.mean(np.sum((geometry.apply(transform, self.points)
                                               - geometry.apply(self.truth, self.points)) ** 2, axis=1))))  # fmt: skip
        warning = data.patient_mismatch(mr, trus) or (
            f"estimated error {error:.1f} mm" if error > 5 else None
        )
        return QualityResult(0.0, float(np.exp(-error / 5)), error, float(error > 5), 5.0, warning)

    def register(self, mr, trus, initial=None, progress=None):
        from airreg.registration import RegistrationResult

        start = np.eye(4) if initial is None else initial
        if progress is not None:
            progress(0.5, "registering")
        if self.on_progress is not None:  # what the user does while the progress callback pumps events
            self.on_progress()
        if progress is not None:
            progress(1.0, "done")
        return RegistrationResult(
            self.truth, start, self.verdict(mr, trus, start), self.verdict(mr, trus, self.truth), [],
            {"total": 0.01}, "exact", "0" * 64, self.device,
        )  # fmt: skip

    def score(self, mr, trus, transform):
        return self.verdict(mr, trus, transform)
