"""Registering an MR-TRUS pair with a trained AIR-net and judging the result: the Python API behind
``airreg register`` / ``airreg score`` and the Slicer module.

``Registrar.register`` starts from an initial MR->TRUS transform (default: volume centres aligned), runs G, and
optionally iterates — G again from its own result, D judging every step, the best-scored step kept (the paper's
"use both networks iteratively"); a model with a refiner (:mod:`airreg.refiner`) runs the refiner instead of G
after the first pass. The quality verdict comes from the calibrated critic (:mod:`airreg.quality`),
the patients' identities where the images carry them, the model's patient check and its input check (are the
images like its training data? :mod:`airreg.input_check`), where it has them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import checkpoint as ckpt
from . import data, input_check, patient_check, preprocessing, refiner, resampling, scoring
from .config import ModelConfig
from .distributed import select_device
from .errors import InputError, ModelError
from .geometry import check_rigid, lps_resampling_to_ras_modeling
from .intensity import NormalizationSpec
from .networks import Discriminator, Generator, load_weights
from .quality import DEFAULT_TOLERANCE_MM, Calibration, QualityResult, assess

Progress = Callable[[float, str], None]

#: Iterations stop once an update moves points by less than this (mm, at the rotation radius).
CONVERGED_MM = 0.05


def centers_aligned(mr: sitk.Image, trus: sitk.Image) -> np.ndarray:
    """MR->TRUS translation that maps the MR volume centre onto the TRUS volume centre (the default start)."""
    m = np.eye(4)
    m[:3, 3] = resampling.physical_center(trus) - resampling.physical_center(mr)
    return m


@dataclass
class RegistrationResult:
    """Outcome of one registration; matrices are MR->TRUS LPS resampling transforms (see geometry.py)."""

    mr_to_trus: np.ndarray
    initial: np.ndarray
    before: QualityResult
    after: QualityResult
    steps: list[dict]
    timings: dict[str, float]
    model: str
    model_sha256: str
    device: str
    selected_step: int = 0
    extra: dict = field(default_factory=dict)
    flag_note: str | None = None  # checkpoint.FLAG_NOT_CALIBRATED when the model's flag is not calibrated
    single_pass_reason: str | None = None  # why iterations were asked for and one G pass was kept

    @property
    def to_parent_ras(self) -> np.ndarray:
        """Slicer's modeling matrix for the TRUS volume ("transform to parent", RAS)."""
        return lps_resampling_to_ras_modeling(self.mr_to_trus)

    @property
    def d_score_before(self) -> float:
        return self.before.d_score

    @property
    def d_score(self) -> float:
        return self.after.d_score

    @property
    def estimated_tre_mm(self) -> float:
        return self.after.estimated_tre_mm

    @property
    def quality(self) -> str:
        return self.after.quality

    @property
    def warning(self) -> str | None:
        return self.after.warning

    @property
    def seconds(self) -> float:
        return self.timings["total"]

    def report(self, transform_file: str | None = None) -> dict:
        """JSON-ready summary (the ``--report`` file of ``airreg register``)."""
        return {
            "d_score_before": self.d_score_before,
            "d_score": self.d_score,
            "estimated_tre_mm_before": self.before.estimated_tre_mm,
            "estimated_tre_mm": self.estimated_tre_mm,
            "p_error_above_tolerance": self.after.p_failure,
            "tolerance_mm": self.after.tolerance_mm,
            "quality": self.quality,
            "warning": self.warning,
            "flag_calibrated": self.flag_note is None,
            "flag_note": self.flag_note,
            "same_patient_score": self.after.same_patient_score,
            "input_check": input_check.report(self.after.input_check),
            "transform_file": transform_file,
            "transform_convention": "ITK resampling transform, LPS mm, maps MR (fixed) points to TRUS (moving) points",
            "mr_to_trus_lps": self.mr_to_trus.tolist(),
            "slicer_to_parent_ras": self.to_parent_ras.tolist(),
            "initial_mr_to_trus_lps": self.initial.tolist(),
            "iterations": self.steps,
            "selected_step": self.selected_step,
            "single_pass_reason": self.single_pass_reason,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "device": self.device,
            "seconds": self.seconds,
            "timings_s": self.timings,
            **self.extra,
        }


class Registrar:
    """A loaded AIR-net model ready to register and score MR-TRUS pairs."""

    def __init__(
        self,
        state: dict,
        device: str = "auto",
        iterations: int = 1,
        tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    ) -> None:
        where = state.get("path", "model")
        if iterations < 1:
            raise InputError(f"iterations must be >= 1, got {iterations}")
        if not tolerance_mm > 0:
            raise InputError(f"tolerance must be > 0 mm, got {tolerance_mm}")
        if state.get("calibration") is None:
            raise ModelError(
                f"{where}: the model has no quality calibration (train it to the end with airreg train)"
            )
        try:
            self.config = ModelConfig.from_dict(state["model_config"])
            self.normalization = NormalizationSpec.from_dict(state["preprocessing"]["normalization"])
            self.calibration = Calibration.from_dict(state["calibration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: model configuration is incomplete or invalid ({exc})") from exc
        self.device = select_device(device)
        message = f"{where}: weights do not match the model configuration stored in the file"
        g, d = (state.get(name) or {} for name in ("generator", "discriminator"))
        self.g = load_weights(Generator(self.config), g, message).to(self.device)
        self.d = load_weights(Discriminator(self.config), d, message).to(self.device)
        loaded = patient_check.load_network(state, self.config, where)
        self.patient_net, self.patient_check = (None, None) if loaded is None else loaded
        if self.patient_net is not None:
            self.patient_net.to(self.device)
        stage = refiner.load_network(state, self.config.dof, where)
        self.refiner, self.refiner_config = (None, None) if stage is None else stage
        if self.refiner is not None:
            self.refiner.to(self.device)
        self.input_check = input_check.load(state, where)
        self.iterations, self.tolerance_mm = iterations, tolerance_mm
        self.model_id = Path(where).name
        self.model_sha256 = state.get("sha256", "")
        self.flag_note = None if ckpt.flag_calibrated(state) else ckpt.FLAG_NOT_CALIBRATED

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        device: str = "auto",
        iterations: int = 1,
        tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    ) -> Registrar:
        """Load a model file (``None``: the bundled model trained on synthetic phantoms)."""
        return cls(ckpt.load(path), device, iterations, tolerance_mm)

    # -- the steps

    def prepare(self, mr: sitk.Image, trus: sitk.Image, start: np.ndarray) -> preprocessing.PreparedPair:
        start = check_rigid(start, "initial transform")
        return preprocessing.prepare_pair(
            mr, trus, start, self.config.grid, self.config.dof, self.normalization, self.device
        )

    def _sample(self, pair: preprocessing.PreparedPair, transforms: torch.Tensor) -> torch.Tensor:
        trus = pair.trus_cache[None, None].expand(transforms.shape[0], 1, *pair.trus_cache.shape)
        return preprocessing.sample_trus(trus, self.config.grid, self.config.dof, transforms)

    @torch.inference_mode()
    def _critic(
        self, pair: preprocessing.PreparedPair, transforms: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """The calibrated statistic of D (see scoring.py), the TRUS coverage of the grid and the TRUS stacks
        (B, S, H, W) for (B, 4, 4) frame transforms."""
        b = transforms.shape[0]
        stacks = self._sample(pair, transforms)
        coverage = (stacks > 0).float().mean(dim=(1, 2, 3))
        volume = pair.trus_cache[None, None].expand(b, 1, *pair.trus_cache.shape)
        from_cache = torch.as_tensor(
            preprocessing.cache_to_index(self.config.grid, self.config.dof), device=self.device
        ).float()
        mr = pair.mr[None].expand(b, *pair.mr.shape)
        name = self.calibration.statistic
        stats = scoring.judge(
            self.d, mr, volume, from_cache, transforms, self.config.grid, self.config.dof, (name,)
        )
        return stats[name].cpu().numpy(), coverage.cpu().numpy(), stacks

    @torch.inference_mode()
    def _patient_logit(self, pair: preprocessing.PreparedPair, trus_stack: torch.Tensor) -> float | None:
        """The patient check's value for one (S, H, W) TRUS stack on the grid; None if the model has no check."""
        if self.patient_net is None:
            return None
        return float(self.patient_net(pair.mr[None], trus_stack[None]).flatten()[0])

    def _refiner_stage(
        self, mr: sitk.Image, trus: sitk.Image, pair: preprocessing.PreparedPair, current: torch.Tensor
    ) -> _Stage:
        """The refiner's view: the pair resampled on its grid around ``current`` (a transform in ``pair``'s frame,
        which the refiner's pair shares: the frame depends on the MR only)."""
        at = preprocessing.frame_transform_to_world(pair, current[0].double().cpu().numpy())
        stage_pair = preprocessing.prepare_pair(
            mr, trus, at, self.refiner_config.grid, self.config.dof, self.normalization, self.device
        )
        return _Stage(self.refiner, stage_pair, self.refiner_config.grid, current)

    def _single_pass_reason(self, inputs: input_check.InputVerdict | None) -> str | None:
        """Why D may not choose among G's passes (None: it may).

        The iterative mode keeps the pass D scores best; a critic that is not calibrated, or that looks at images
        unlike its training data, ranks passes no better than chance, and repeated G passes then drift further
        from the truth than one pass does (BENCHMARKS.md §8), so G's first pass is kept instead.
        """
        if self.flag_note is not None:
            return "one generator pass: the model's flag is not calibrated, so D does not choose among passes"
        if inputs is not None and inputs.out_of_distribution:
            return "one generator pass: the images are unlike the model's training data, so D does not choose among passes"
        return None

    def _judge_inputs(self, pair: preprocessing.PreparedPair) -> input_check.InputVerdict | None:
        """The input check's verdict on what the networks see; None if the model has no check."""
        return None if self.input_check is None else self.input_check.judge(pair.mr, pair.trus_cache)

    def _verdict(
        self,
        critic: float,
        coverage: float,
        input_warning: str | None = None,
        patient_logit: float | None = None,
        inputs: input_check.InputVerdict | None = None,
    ) -> QualityResult:
        return assess(
            critic,
            self.calibration,
            self.tolerance_mm,
            coverage,
            input_warning,
            patient_logit,
            self.patient_check,
            inputs,
        )

    @torch.inference_mode()
    def register(
        self,
        mr: sitk.Image,
        trus: sitk.Image,
        initial: np.ndarray | None = None,
        progress: Progress | None = None,
        iterations: int | None = None,
    ) -> RegistrationResult:
        """Register TRUS (moving) to MR (fixed); ``initial`` is an MR->TRUS LPS matrix (default: centres aligned).

        ``iterations`` overrides the registrar's number of generator passes for this call.
        """
        n_iter = self.iterations if iterations is None else iterations
        if n_iter < 1:
            raise InputError(f"iterations must be >= 1, got {n_iter}")
        report = progress or (lambda fraction, message: None)
        t0 = time.perf_counter()
        start = centers_aligned(mr, trus) if initial is None else np.asarray(initial, dtype=float)
        report(0.05, "resampling")
        pair = self.prepare(mr, trus, start)
        t1 = time.perf_counter()
        inputs = self._judge_inputs(pair)  # timed with the verdict, in the discriminator stage
        t_judged = time.perf_counter()
        single_pass_reason = self._single_pass_reason(inputs) if n_iter > 1 else None
        if single_pass_reason is not None:
            n_iter = 1
        eye = torch.eye(4, device=self.device)[None]
        current, candidates, steps = eye, [eye], []
        stage, refiner_resampling = _Stage(self.g, pair, self.config.grid, eye), 0.0
        for i in range(n_iter):
            if i == 1 and self.refiner is not None:
                t_stage = time.perf_counter()
                try:
                    stage = self._refiner_stage(mr, trus, pair, current)
                except InputError:
                    break  # G's pass left the TRUS outside the refiner's grid: keep the passes so far
                finally:
                    refiner_resampling = time.perf_counter() - t_stage
            report(0.1 + 0.8 * i / n_iter, f"generator pass {i + 1} of {n_iter}")
            update, current = stage.step(self.config.dof)
            candidates.append(current)
            moved = _update_size_mm(update[0].cpu().numpy())
            steps.append({"step": i + 1, "update_mm": moved})
            if moved < CONVERGED_MM:
                break
        t2 = time.perf_counter()
        report(0.92, "scoring")
        critic, coverage, stacks = self._critic(pair, torch.cat(candidates))
        # step 0 is the start; the best-scored estimate is kept (a single pass keeps G's estimate)
        best = 1 + int(np.argmax(critic[1:])) if n_iter > 1 else 1
        for step, c in zip(steps, critic[1:], strict=False):
            step["d_score"] = self._verdict(float(c), 1.0).d_score
        mismatch = data.patient_mismatch(mr, trus)
        patient_logit = self._patient_logit(pair, stacks[best])
        t3 = time.perf_counter()
        transform_in_frame = candidates[best][0].double().cpu().numpy()
        result = RegistrationResult(
            mr_to_trus=preprocessing.frame_transform_to_world(pair, transform_in_frame),
            initial=start,
            before=self._verdict(float(critic[0]), float(coverage[0]), mismatch, inputs=inputs),
            after=self._verdict(float(critic[best]), float(coverage[best]), mismatch, patient_logit, inputs),
            steps=steps,
            timings={
                "resampling": t1 - t0 + refiner_resampling,
                "generator": t2 - t_judged - refiner_resampling,
                "discriminator": t3 - t2 + t_judged - t1,
                "total": t3 - t0,
            },
            model=self.model_id,
            model_sha256=self.model_sha256,
            device=str(self.device),
            selected_step=best,
            flag_note=self.flag_note,
            single_pass_reason=single_pass_reason,
        )
        report(1.0, "done")
        return result

    def score(self, mr: sitk.Image, trus: sitk.Image, transform: np.ndarray) -> QualityResult:
        """Quality verdict on any given MR->TRUS LPS alignment (manual, another tool's, ...)."""
        return self.inspect(mr, trus, transform)[2]

    @torch.inference_mode()
    def inspect(
        self, mr: sitk.Image, trus: sitk.Image, transform: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, QualityResult]:
        """What the networks see for an alignment: MR and TRUS stacks (S, H, W) in [0, 1], and the verdict."""
        pair = self.prepare(mr, trus, transform)
        eye = torch.eye(4, device=self.device)[None]
        critic, coverage, stacks = self._critic(pair, eye)
        trus_stack = stacks[0]
        mismatch, patient_logit = data.patient_mismatch(mr, trus), self._patient_logit(pair, trus_stack)
        inputs = self._judge_inputs(pair)
        verdict = self._verdict(float(critic[0]), float(coverage[0]), mismatch, patient_logit, inputs)
        return pair.mr.cpu().numpy(), trus_stack.cpu().numpy(), verdict


@dataclass
class _Stage:
    """A generator and the pair it sees on its grid; ``base``: the frame transform at which the pair's TRUS cache
    was sampled, so that an estimate ``rel`` on this pair is ``base @ rel`` in the first pair's frame."""

    net: Generator
    pair: preprocessing.PreparedPair
    grid: resampling.GridSpec
    base: torch.Tensor
    rel: torch.Tensor | None = None

    def step(self, dof: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One generator pass: (the update, the new estimate in the first pair's frame)."""
        rel = torch.eye(4, device=self.base.device)[None] if self.rel is None else self.rel
        trus = self.pair.trus_cache[None, None]
        x = preprocessing.sample_trus(trus, self.grid, dof, rel)
        update = resampling.rigid_matrices(self.net(self.pair.mr[None], x), dof)
        self.rel = rel @ update
        return update, self.base @ self.rel


def _update_size_mm(matrix: np.ndarray, radius_mm: float = 25.0) -> float:
    """How far a frame transform moves a point at ``radius_mm`` from the grid centre, at most (approximately)."""
    angle = np.arccos(np.clip((np.trace(matrix[:3, :3]) - 1) / 2, -1.0, 1.0))
    return float(np.linalg.norm(matrix[:3, 3]) + angle * radius_mm)
