"""A learned check that the MR and the TRUS show the same patient (an extension of the paper): inference.

Once G has aligned two glands, D judges how well they are aligned; it rarely tells that the TRUS belongs to
another patient (BENCHMARKS.md, section 2), because a well-aligned wrong gland is still a plausible alignment.
The patient check ``P`` is a third network with D's architecture, trained with G frozen (``airreg
train-patient-check``, :mod:`airreg.patient_check_training`) on one question only: is this G's registration of
the case's own TRUS, or of another case's TRUS?

Its threshold and the detection rate measured on validation cases are stored with it in the model file
(``patient_check`` and ``patient_check_calibration``). At inference P runs once, on the result, and a score below
the threshold is a warning. Where the patients' identities are known (DICOM, Slicer's subject hierarchy) they are
compared too (:func:`airreg.data.patient_mismatch`), and a mismatch is reported first.

This module is on the inference path (Slicer imports it): torch and the networks only, no training code.
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import ModelError
from .networks import Discriminator, load_weights
from .quality import PatientCheckCalibration


def load_network(
    state: dict, config: ModelConfig, where: str
) -> tuple[Discriminator, PatientCheckCalibration] | None:
    """The patient check of a model file and its calibration, or None if the model has none."""
    if state.get("patient_check") is None:
        return None
    if state.get("patient_check_calibration") is None:
        raise ModelError(f"{where}: the patient check has no calibration")
    message = f"{where}: patient-check weights do not match the model configuration"
    net = load_weights(Discriminator(config), state["patient_check"], message)
    return net, PatientCheckCalibration.from_dict(state["patient_check_calibration"])
