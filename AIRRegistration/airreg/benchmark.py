"""``airreg benchmark``: AIR-net against classical rigid registration on the same pairs, starts and machine.

For each protocol (the paper's 3-DOF axial starts and 6-DOF starts; ±25°, ±5 mm in the MR grid frame, drawn once
from ``--seed`` with :func:`airreg.evaluation.random_starts`) every method registers every case from the *same*
start, and the TRE is measured the same way as ``airreg evaluate`` (landmarks, else gland points):

* ``start`` — no registration; ``centres`` — volume centres aligned (ignores the start);
* ``MI`` — SimpleITK rigid registration with Mattes mutual information, and ``MI+masks`` — the same with the
  prostate masks (dilated by :data:`MASK_DILATION_MM`, so that the gland boundary is inside) as metric masks,
  only when every case has both masks;
* ``elastix`` — elastix's default rigid parameter map (itk-elastix), when ``import itk`` works;
* ``AIR-net 1 pass`` — one generator pass; ``AIR-net iterative`` — :data:`AIRNET_ITERATIONS` passes with the
  critic keeping the best-scored step (the ``airreg register`` default).

Mutual-information settings — what a competent user would choose (SimpleITK's documented recipe for multi-modal
rigid registration, not tuned on these data): Mattes MI with 50 histogram bins, random sampling of 15 % of the
fixed voxels (fixed seed), linear interpolation; an ``Euler3DTransform`` (ComputeZYX, 6 DOF in both protocols
— a user does not know the error is in-plane) centred on the MR volume centre and initialised with the start;
three resolution levels, shrink factors 4, 2, 1 and Gaussian smoothing 2, 1, 0 mm; regular-step gradient descent
(initial step 2 mm, minimum step 0.01 mm, relaxation 0.5, at most 100 iterations per level; 20 with ``--quick``)
with parameter scales from the physical shift. With masks, ITK draws the samples over the whole MR and drops
those outside the mask, so the percentage is raised by the inverse of the mask's share of the MR (capped at 100 %)
to keep the number of samples. Fixed = MR, moving = TRUS, so the resulting transform maps MR
points to TRUS points: the project's convention, no inversion needed. A registration that raises (e.g. "Too
many samples map outside moving image buffer") counts as a failure with the start's TRE.

elastix: ``GetDefaultParameterMap("rigid")`` (EulerTransform, AdvancedMattesMutualInformation, adaptive stochastic
gradient descent, 3 resolutions, 2048 random samples per iteration, automatic scales), 250 iterations per
level (20 with ``--quick``). elastix cannot take a matrix as initial transform through its Python API without a
parameter file, so the start is folded into the TRUS image geometry instead (origin and direction rewritten by
the inverse of the start — no resampling) and the result composed with the start.

Timing is wall-clock per pair (``time.perf_counter``) on whatever else runs on the machine (the load average is
recorded). Memory is measured in a separate pass over the first few cases so that instrumentation does not
slow the timed pass: ``tracemalloc`` peak (Python objects and NumPy arrays only — not torch's or ITK's own
allocations) and the process's peak resident set size above its level at the start of the method (Linux
``VmHWM`` reset through ``/proc/self/clear_refs``; elsewhere the growth of ``ru_maxrss``, which stays 0 when an
earlier step had a higher peak).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import shlex
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import stats
from tqdm import tqdm

from . import __version__, data, geometry, resampling
from .config import TrainConfig, preset
from .errors import AirRegError
from .evaluation import random_starts, summary_stats, tre_mm, tre_points
from .fileio import write_json, write_text
from .plotting import box_plots, scatter
from .registration import Registrar, centers_aligned

DEFAULT_SEED = 4242
AIRNET_ITERATIONS = 3
QUICK_CASES = 3
MASK_DILATION_MM = 5.0

START, CENTRES, MI, MI_MASKS, ELASTIX = "start", "centres", "MI", "MI+masks", "elastix"
AIR_ONE, AIR_ITER = "AIR-net 1 pass", "AIR-net iterative"
METHOD_ORDER = (START, CENTRES, MI, MI_MASKS, ELASTIX, AIR_ONE, AIR_ITER)
METHOD_DESCRIPTIONS = {
    START: "no registration (the seeded random start)",
    CENTRES: "MR and TRUS volume centres aligned",
    MI: "SimpleITK rigid, Mattes MI, 3 levels (see settings)",
    MI_MASKS: f"as MI, prostate masks dilated {MASK_DILATION_MM:g} mm as metric masks",
    ELASTIX: "elastix default rigid map (itk-elastix)",
    AIR_ONE: "AIR-net, one generator pass",
    AIR_ITER: f"AIR-net, {AIRNET_ITERATIONS} generator passes, critic keeps the best",
}

Method = Callable[[data.Case, np.ndarray], np.ndarray]


# --- the machine and memory -----------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU model, cores, memory, load and library versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gb": _meminfo_gb("MemTotal"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "airreg": __version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "simpleitk": sitk.Version.VersionString(),
        "simpleitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "numpy": np.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _meminfo_gb(key: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak Python-side allocation (tracemalloc) and peak RSS growth of the process while the block runs."""

    def __init__(self, python: bool = True) -> None:
        self.python = python  # tracemalloc slows Python-heavy code (e.g. torch's first optimiser step) a lot
        self.python_peak_mb = float("nan")

    def __enter__(self) -> MemoryProbe:
        self.rss_method = _memory_method()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base_kb = _status_kb("VmRSS")
            if self.base_kb is None:
                raise OSError("no VmRSS")
        except OSError:
            self.rss_method = _memory_method(fallback=True)
            self.base_kb = None
        self.maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self.python:
            tracemalloc.start()
            tracemalloc.reset_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.python:
            self.python_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        if self.base_kb is not None:
            peak = _status_kb("VmHWM") or self.base_kb
            self.rss_peak_mb = peak / 1024
            self.rss_increase_mb = max(0, peak - self.base_kb) / 1024
        else:
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.rss_peak_mb = after / 1024
            self.rss_increase_mb = max(0, after - self.maxrss_kb) / 1024


# --- the classical methods ------------------------------------------------------------------------------


def _euler_from_matrix(matrix: np.ndarray, center: np.ndarray) -> sitk.Euler3DTransform:
    """An Euler3DTransform (ComputeZYX) centred at ``center`` with the mapping of a rigid 4x4 matrix."""
    m = geometry.check_rigid(matrix, "start")
    tx = sitk.Euler3DTransform()
    tx.SetComputeZYX(True)
    tx.SetCenter(center.tolist())
    tx.SetMatrix(m[:3, :3].ravel().tolist())
    r = m[:3, :3]
    tx.SetTranslation((m[:3, 3] - center + r @ center).tolist())
    return tx


def _dilated(mask: sitk.Image, mm: float) -> sitk.Image:
    radius = [max(1, int(round(mm / s))) for s in mask.GetSpacing()]
    return sitk.BinaryDilate(mask, radius, sitk.sitkBall, 0, 1)


def mi_registration(iterations: int = 100, sampling: float = 0.15, seed: int = 0) -> Callable:
    """SimpleITK Mattes-MI rigid registration (module docstring); returns ``f(case, start, masks=None)``."""

    def register(case: data.Case, start: np.ndarray, masks: tuple | None = None) -> np.ndarray:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        share = sampling
        if masks is not None:  # ITK draws samples over the whole image and drops those outside the mask:
            inside = float(np.mean(sitk.GetArrayViewFromImage(masks[0]) > 0))  # keep the number of samples
            share = min(1.0, sampling / max(inside, 1e-6))
        reg.SetMetricSamplingPercentage(share, seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0,
            minStep=0.01,
            numberOfIterations=iterations,
            relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-6,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(_euler_from_matrix(start, resampling.physical_center(case.mr)), inPlace=False)
        if masks is not None:
            reg.SetMetricFixedMask(masks[0])
            reg.SetMetricMovingMask(masks[1])
        result = reg.Execute(case.mr, case.trus)
        return geometry.from_sitk(result, "MI result")

    return register


def elastix_status() -> tuple[bool, str]:
    """Whether itk-elastix can be used, and why not (loading its module takes tens of seconds once)."""
    t0 = time.perf_counter()
    try:
        import itk

        itk.ParameterObject.New()  # loads the elastix module
        _ = itk.ElastixRegistrationMethod
    except Exception as exc:  # noqa: BLE001 - any import/load problem means "not available"
        return False, f"not installed or not loadable ({type(exc).__name__}: {exc})"
    return True, f"itk {itk.__version__}, elastix module loaded in {time.perf_counter() - t0:.1f} s"


def _to_itk(image: sitk.Image, index_to_world: np.ndarray):
    import itk

    out = itk.image_from_array(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)))
    spacing = np.asarray(image.GetSpacing(), float)
    out.SetSpacing(spacing.tolist())
    out.SetOrigin(index_to_world[:3, 3].tolist())
    out.SetDirection(itk.matrix_from_array(np.ascontiguousarray(index_to_world[:3, :3] / spacing)))
    return out


def elastix_registration(iterations: int = 250) -> Callable:
    """elastix default rigid registration from a start folded into the TRUS geometry (module docstring)."""
    import itk

    def register(case: data.Case, start: np.ndarray, masks: tuple | None = None) -> np.ndarray:
        fixed = _to_itk(case.mr, resampling.index_to_world(case.mr))
        # TRUS in "start-undone" coordinates: x' = start^-1(x), so MR -> TRUS' is the identity at the start
        moving = _to_itk(case.trus, geometry.invert(start) @ resampling.index_to_world(case.trus))
        params = itk.ParameterObject.New()
        pmap = params.GetDefaultParameterMap("rigid", 3)
        pmap["MaximumNumberOfIterations"] = [str(iterations)]
        pmap["WriteResultImage"] = ["false"]
        pmap["AutomaticTransformInitialization"] = ["false"]
        params.AddParameterMap(pmap)
        method = itk.ElastixRegistrationMethod.New(fixed, moving)
        method.SetParameterObject(params)
        method.SetLogToConsole(False)
        method.SetLogToFile(False)
        method.UpdateLargestPossibleRegion()
        result = method.GetTransformParameterObject()
        p = [float(v) for v in result.GetParameter(0, "TransformParameters")]
        center = [float(v) for v in result.GetParameter(0, "CenterOfRotationPoint")]
        zyx = (
            result.GetParameter(0, "ComputeZYX") if "ComputeZYX" in result.GetParameterMap(0) else ("false",)
        )
        euler = sitk.Euler3DTransform(center, p[0], p[1], p[2], p[3:6])
        euler.SetComputeZYX(zyx[0] == "true")
        return start @ geometry.from_sitk(euler, "elastix result")

    return register


# --- running the methods --------------------------------------------------------------------------------


def _run_one(method: Method, case: data.Case, start: np.ndarray) -> tuple[np.ndarray, float, str | None]:
    """(transform, seconds, error message); an ITK or input error leaves the start in place."""
    t0 = time.perf_counter()
    try:
        result = method(case, start)
        error = None
    except (RuntimeError, AirRegError) as exc:
        result, error = start, " ".join(str(exc).split())[-300:]
    seconds = time.perf_counter() - t0
    if error is None and not np.all(np.isfinite(result)):
        result, error = start, "non-finite transform"
    return np.asarray(result, float), seconds, error


def build_methods(
    registrar: Registrar, cases: Sequence[data.Case], quick: bool, use_elastix: bool, seed: int
) -> tuple[dict[str, Method], dict[str, str], str]:
    """The methods to run (in report order), the ones skipped with the reason, and elastix's status."""
    skipped: dict[str, str] = {}
    mi = mi_registration(iterations=20 if quick else 100, seed=seed)
    methods: dict[str, Method] = {
        START: lambda case, start: start.copy(),
        CENTRES: lambda case, start: centers_aligned(case.mr, case.trus),
        MI: lambda case, start: mi(case, start),
    }
    if all(c.mr_mask is not None and c.trus_mask is not None for c in cases):
        dilated = {
            id(c): (_dilated(c.mr_mask, MASK_DILATION_MM), _dilated(c.trus_mask, MASK_DILATION_MM))
            for c in cases
        }
        methods[MI_MASKS] = lambda case, start: mi(case, start, dilated[id(case)])
    else:
        skipped[MI_MASKS] = "not every case has mr_prostate and trus_prostate masks"
    if use_elastix:
        ok, why = elastix_status()
        elastix_note = why if ok else f"not run: {why}"
        if ok:
            elx = elastix_registration(iterations=20 if quick else 250)
            methods[ELASTIX] = lambda case, start: elx(case, start)
        else:
            skipped[ELASTIX] = why
    else:
        skipped[ELASTIX] = "disabled by the caller (elastix=False / --no-elastix)"
        elastix_note = "not run: disabled by the caller"
    methods[AIR_ONE] = lambda case, start: (
        registrar.register(case.mr, case.trus, start, iterations=1).mr_to_trus
    )
    methods[AIR_ITER] = lambda case, start: (
        registrar.register(case.mr, case.trus, start, iterations=AIRNET_ITERATIONS).mr_to_trus
    )
    return methods, skipped, elastix_note


def _d_score(registrar: Registrar, case: data.Case, transform: np.ndarray) -> float:
    try:
        return registrar.score(case.mr, case.trus, transform).d_score
    except AirRegError:  # no overlap at all: no score
        return float("nan")


def run_protocol(
    dof: int,
    cases: Sequence[data.Case],
    methods: dict[str, Method],
    registrar: Registrar,
    seed: int,
    memory_cases: int,
    progress: bool,
) -> dict:
    """Every method on every case from the same seeded starts: per-case rows and per-method figures."""
    starts = random_starts(cases, dof, seed)
    points = [tre_points(c) for c in cases]
    start_tre = [tre_mm(s, p) for s, p in zip(starts, points, strict=True)]
    registrar.register(cases[0].mr, cases[0].trus, starts[0])  # warm-up (lazy initialisation), not timed
    rows, summary = [], {}
    for name, method in methods.items():
        t_method = time.perf_counter()
        tres, secs, errors, scores = [], [], [], []
        bar = tqdm(cases, desc=f"{dof}-DOF {name}", disable=not progress, unit="pair", leave=False)
        for i, case in enumerate(bar):
            transform, seconds, error = _run_one(method, case, starts[i])
            tre = tre_mm(transform, points[i])
            score = _d_score(registrar, case, transform)
            tres.append(tre)
            secs.append(seconds)
            errors.append(error)
            scores.append(score)
            rows.append(
                {
                    "case": case.case_id,
                    "method": name,
                    "tre_mm": tre,
                    "tre_start_mm": start_tre[i],
                    "seconds": seconds,
                    "d_score": score,
                    "error": error,
                }
            )
        with MemoryProbe() as probe:
            for i in range(min(memory_cases, len(cases))):
                _run_one(method, cases[i], starts[i])
        worse = [e is not None or t > s + 1e-9 for t, s, e in zip(tres, start_tre, errors, strict=True)]
        summary[name] = {
            **summary_stats(tres),
            "failures": int(sum(worse)),
            "failure_share": float(np.mean(worse)),
            "errors": int(sum(e is not None for e in errors)),
            "median_seconds": float(np.median(secs)),
            "mean_seconds": float(np.mean(secs)),
            "peak_python_mb": probe.python_peak_mb,
            "peak_rss_increase_mb": probe.rss_increase_mb,
            "peak_rss_mb": probe.rss_peak_mb,
            "memory_method": probe.rss_method,
            "memory_cases": min(memory_cases, len(cases)),
            "mean_d_score": float(np.nanmean(scores)) if np.isfinite(scores).any() else None,
            "benchmark_seconds": time.perf_counter() - t_method,
        }
    reference = summary[AIR_ONE]["median_seconds"]
    for name in summary:
        summary[name]["time_ratio_to_airnet_one_pass"] = summary[name]["median_seconds"] / reference
    return {"dof": dof, "seed": seed, "cases": len(cases), "methods": summary, "per_case": rows}


# --- AIR-net latency ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def upsampled(image: sitk.Image, spacing_mm: Sequence[float]) -> sitk.Image:
    """The image resampled (linear) to a finer ``spacing_mm`` (x, y, z) over the same physical box, float32."""
    old = np.asarray(image.GetSpacing(), dtype=float)
    steps = (np.asarray(image.GetSize()) - 1) * old / np.asarray(spacing_mm, dtype=float)
    size = np.ceil(steps - 1e-6).astype(int) + 1
    return sitk.Resample(
        image,
        [int(v) for v in size],
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        [float(v) for v in spacing_mm],
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )


def upsampled_cases(
    cases: Sequence[data.Case], trus_mm: float | None, mr_inplane_mm: float | None
) -> list[data.Case]:
    """Cases with the TRUS resampled to isotropic ``trus_mm`` and the MR to ``mr_inplane_mm`` in-plane (slices
    kept): the same anatomy in a larger file, to time how the cost grows with the input."""
    out = []
    for case in cases:
        changes = {}
        if trus_mm:
            changes["trus"] = upsampled(case.trus, [trus_mm] * 3)
        if mr_inplane_mm:
            slice_axis = int(np.argmax(case.mr.GetSpacing()))
            spacing = [mr_inplane_mm] * 3
            spacing[slice_axis] = case.mr.GetSpacing()[slice_axis]
            changes["mr"] = upsampled(case.mr, spacing)
        out.append(dataclasses.replace(case, **changes))
    return out


def _networks(registrar: Registrar) -> list[tuple[str, torch.nn.Module]]:
    """The networks a registration runs: G, D and the patient check (if the model has one)."""
    nets = [("generator", registrar.g), ("discriminator", registrar.d)]
    return nets + ([("patient_check", registrar.patient_net)] if registrar.patient_net is not None else [])


@torch.inference_mode()
def airnet_latency(
    registrar: Registrar,
    cases: Sequence[data.Case],
    threads: int | None,
    n_cases: int,
    repeats: int,
    batch: int = 16,
    bf16: bool = False,
) -> list[dict]:
    """Rows of the latency table for one thread count (``None``: a GPU, threads untouched).

    Batch 1: ``Registrar.register(..., iterations=1)`` per pair, with its TRE and D-score (from the ground truth
    start). Batch ``batch``: G, D and the patient check forward on random stacks (float32, and bf16 autocast when
    ``bf16``), plus ``batch`` pairs prepared one after the other.
    """
    device = registrar.device
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        sample = list(cases[:n_cases])
        registrar.register(sample[0].mr, sample[0].trus, sample[0].gt, iterations=1)  # warm-up
        timings, tres, scores, cpu = [], [], [], []
        for case in sample:
            _sync(device)
            c0 = time.thread_time()
            result = registrar.register(case.mr, case.trus, case.gt, iterations=1)
            cpu.append(time.thread_time() - c0)
            timings.append(result.timings)
            tres.append(tre_mm(result.mr_to_trus, tre_points(case)))
            scores.append(result.d_score)
        row1 = {
            "device": str(device),
            "threads": threads,
            "batch": 1,
            "autocast": "off",
            **{f"{k}_ms": 1000 * float(np.median([t[k] for t in timings])) for k in timings[0]},
            "pairs_timed": len(sample),
            "cpu_ms": 1000 * float(np.median(cpu)) if threads == 1 else None,
            "mean_tre_mm": float(np.mean(tres)),
            "mean_d_score": float(np.mean(scores)),
        }
        t0 = time.perf_counter()
        for i in range(batch):  # per-pair preprocessing does not batch: one pair after the other
            case = sample[i % len(sample)]
            registrar.prepare(case.mr, case.trus, case.gt)
        _sync(device)
        resample = time.perf_counter() - t0
        rows = [row1]
        for autocast in (False, True) if bf16 else (False,):
            times = _forward_times(registrar, batch, repeats, autocast)
            rows.append(
                {
                    "device": str(device),
                    "threads": threads,
                    "batch": batch,
                    "autocast": "bf16" if autocast else "off",
                    "resampling_ms": 1000 * resample,
                    "generator_ms": 1000 * times["generator"],
                    "discriminator_ms": 1000 * (times["discriminator"] + times.get("patient_check", 0.0)),
                    "total_ms": 1000 * (resample + sum(times.values())),
                    "pairs_timed": batch,
                    "repeats": repeats,
                }
            )
        for row in rows:
            row["per_pair_ms"] = row["total_ms"] / row["batch"]
            row["networks_pairs_per_s"] = row["batch"] / (
                (row["generator_ms"] + row["discriminator_ms"]) / 1000
            )
        return rows
    finally:
        torch.set_num_threads(before)


def _forward_times(registrar: Registrar, batch: int, repeats: int, bf16: bool) -> dict[str, float]:
    """Median seconds of each network's forward pass on (batch, S, H, W) random stacks."""
    device = registrar.device
    s, h, w = registrar.config.grid.size
    rng = np.random.default_rng(0)
    mr = torch.from_numpy(rng.random((batch, s, h, w), dtype=np.float32)).to(device)
    trus = torch.from_numpy(rng.random((batch, s, h, w), dtype=np.float32)).to(device)
    times = {}
    for key, net in _networks(registrar):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            net(mr, trus)  # warm-up
            seconds = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                net(mr, trus)
                _sync(device)
                seconds.append(time.perf_counter() - t0)
        times[key] = float(np.median(seconds))
    return times


# --- training throughput --------------------------------------------------------------------------------


def training_throughput(
    preset_name: str,
    batch_size: int,
    iterations: int,
    device: torch.device,
    n_cases: int = 4,
    threads: int | None = None,
) -> dict:
    """Time ``iterations`` training iterations (n_critic critic updates + one generator update, each on a fresh
    batch) of a preset on a small synthetic cache of random arrays; pairs/s = batch x iterations / seconds."""
    from . import distributed, preprocessing
    from .training import CaseCache

    model = preset(preset_name, 3)
    cache_grid = preprocessing.cache_spec(model.grid, model.dof)
    rng = np.random.default_rng(0)
    cache = CaseCache(
        ids=[f"random{i}" for i in range(n_cases)],
        mr=rng.random((n_cases, *model.grid.size), dtype=np.float32).astype(np.float16),
        trus=rng.random((n_cases, *cache_grid.size), dtype=np.float32).astype(np.float16),
        points=rng.normal(scale=15.0, size=(n_cases, 6, 3)).astype(np.float32),
    )
    cfg = TrainConfig(batch_size=batch_size, seed=0)
    ctx = distributed.DistContext(0, 1, device)
    before = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _time_training(preset_name, model, cache, cfg, ctx, iterations)
    finally:
        torch.set_num_threads(before)


def _time_training(preset_name, model, cache, cfg: TrainConfig, ctx, iterations: int) -> dict:
    from .training import Trainer

    device, batch_size = ctx.device, cfg.batch_size
    with MemoryProbe(python=False) as probe:
        trainer = Trainer(model, cfg, ctx)

        def iteration(step: int) -> None:
            for sub in range(cfg.n_critic + 1):
                b = trainer.draw_batch(cache, 0, step, sub)
                if sub < cfg.n_critic:
                    trainer.critic_step(b)
                else:
                    trainer.generator_step(b)

        iteration(0)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for step in range(1, iterations + 1):
            iteration(step)
        _sync(device)
        seconds = time.perf_counter() - t0
    return {
        "preset": preset_name,
        "grid": list(model.grid.size),
        "width": model.width,
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch": batch_size,
        "iterations_timed": iterations,
        "seconds_per_iteration": seconds / iterations,
        "pairs_per_second": batch_size * iterations / seconds,
        "peak_rss_mb": probe.rss_peak_mb,
        "peak_rss_increase_mb": probe.rss_increase_mb,
        "memory_method": probe.rss_method,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def throughput_table(device: torch.device, quick: bool, progress: bool) -> tuple[list[dict], dict]:
    """Throughput rows per preset (and per thread count on a CPU: 1, and 2 unless ``quick``), and skips."""
    plans = [
        ("tiny", 8 if quick else 32, 2 if quick else 5),
        ("default", 4 if quick else 32, 1 if quick else 3),
    ]
    skipped = {}
    if quick:
        skipped["paper"] = "skipped with --quick"
    elif device.type == "cpu" and (_meminfo_gb("MemAvailable") or 0) < 4:
        skipped["paper"] = f"skipped: {(_meminfo_gb('MemAvailable') or 0):.1f} GB available, 4 GB wanted"
    else:
        plans.append(("paper", 2 if device.type == "cpu" else 16, 1 if device.type == "cpu" else 3))
    thread_counts: tuple[int | None, ...] = (None,) if device.type != "cpu" else (1,) if quick else (1, 2)
    rows = []
    for name, batch, iters in tqdm(plans, desc="training throughput", disable=not progress, leave=False):
        for threads in thread_counts if name != "paper" else thread_counts[-1:]:
            try:
                rows.append(training_throughput(name, batch, iters, device, threads=threads))
            except (RuntimeError, MemoryError) as exc:  # e.g. out of memory on a small GPU
                skipped[name] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    return rows, skipped


# --- report ---------------------------------------------------------------------------------------------


def _fmt(v, spec: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def markdown(report: dict) -> str:
    """BENCHMARKS.md-style text of a report."""
    m = report["machine"]
    lines = [
        "# AIR-net benchmark: accuracy and speed against classical rigid registration",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Data: `{report['data']}` ({report['cases']} cases{', --quick' if report['quick'] else ''}); "
        f"model: `{report['model']['id']}` ({report['model']['dof']}-DOF, preset grid "
        f"{'x'.join(map(str, report['model']['grid']))}, sha256 {report['model']['sha256'][:12]}); "
        f"seed of the starts: {report['seed']}.",
        "",
    ]
    for key, proto in report["protocols"].items():
        lines += [
            f"## {key} starts (±25°, ±5 mm), {proto['cases']} pairs",
            "",
            "| method | mean TRE (mm) | median | p90 | < 2 mm | < 5 mm | failures | median s/pair "
            "| time / AIR-net 1 pass | peak Python MB | peak RSS +MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in proto["methods"].items():
            fail = f"{s['failures']}" + (f" ({s['errors']} errors)" if s["errors"] else "")
            lines.append(
                f"| {name} | {s['mean']:.2f} | {s['median']:.2f} | {s['p90']:.2f} | {s['under_2mm']:.0%} "
                f"| {s['under_5mm']:.0%} | {fail} | {s['median_seconds']:.4f} "
                f"| {s['time_ratio_to_airnet_one_pass']:.2f} | {s['peak_python_mb']:.1f} "
                f"| {s['peak_rss_increase_mb']:.1f} |"
            )
        lines.append("")
    if report["goal"]:
        lines += ["## Goal check (AIR-net TRE ≤ ½ of MI, ≥ 20× faster per pair)", ""]
        for key, g in report["goal"].items():
            lines.append(
                f"- {key}: TRE AIR-net iterative / MI = {_fmt(g['tre_ratio'])} (mean), "
                f"MI time / AIR-net 1 pass = {_fmt(g['speedup_one_pass'], '.1f')}×, "
                f"/ AIR-net iterative = {_fmt(g['speedup_iterative'], '.1f')}× → "
                f"accuracy goal {'met' if g['accuracy_met'] else 'NOT met'}, "
                f"speed goal {'met' if g['speed_met'] else 'NOT met'}"
            )
        lines.append("")
    lines += [
        "## AIR-net latency per stage (median ms)",
        "",
        _inputs_line(report["inputs"]),
        "",
        "| device | threads | batch | autocast | resampling | G | D | total | per pair | CPU ms | G+D pairs/s "
        "| TRE (mm) | D-score |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["latency"]:
        lines.append(
            f"| {r['device']} | {r['threads'] or '–'} | {r['batch']} | {r['autocast']} "
            f"| {r['resampling_ms']:.1f} | {r['generator_ms']:.1f} | {r['discriminator_ms']:.1f} "
            f"| {r['total_ms']:.1f} | {r['per_pair_ms']:.1f} | {_fmt(r.get('cpu_ms'), '.1f')} "
            f"| {r['networks_pairs_per_s']:.0f} "
            f"| {_fmt(r.get('mean_tre_mm'))} | {_fmt(r.get('mean_d_score'), '.3f')} |"
        )
    lines += [
        "",
        "Batch 1: `Registrar.register(..., iterations=1)` from the ground truth, per pair (resampling = normalising "
        "and sampling the pair; D = scoring the start and the result, the patient check and the verdict), with "
        "the mean TRE and D-score of those registrations. Larger batches: G, D and the patient check forward on "
        "random (batch, S, H, W) stacks; resampling = the pairs prepared one after the other (it does not batch); "
        "G+D pairs/s = the networks' throughput alone. CPU ms (one thread, batch 1): the thread's CPU time per "
        "registration, which other jobs on a shared machine barely change (the wall-clock columns they do).",
        "",
    ]
    if report["protocols"]:  # a full run (not --latency-only)
        lines += _throughput_and_methods_lines(report)
    lines += [
        "## Machine",
        "",
        f"- CPU: {m['cpu']}; {m['logical_cores']} logical cores ({m['usable_cores']} usable); "
        f"{_fmt(m['memory_gb'], '.1f')} GB RAM; load average at start {m['load_average']}",
        f"- GPU: {m['cuda'] or 'none'}",
        f"- torch {m['torch']} ({m['torch_threads']} threads), SimpleITK {m['simpleitk']} "
        f"({m['simpleitk_threads']} threads), numpy {m['numpy']}, Python {m['python']}, airreg {m['airreg']}",
        f"- {m['platform']}",
        f"- total benchmark time: {report['seconds']:.0f} s",
    ]
    if report["protocols"]:
        lines += [
            "",
            "Figures: `tre_boxplots.png` (TRE per method and protocol), `dscore_vs_tre.png` (AIR-net D-score of "
            "the start and of every method's result against its TRE).",
        ]
    return "\n".join(lines) + "\n"


def _throughput_and_methods_lines(report: dict) -> list[str]:
    """The training-throughput table and the methods' settings (sections of a full run)."""
    lines = [
        "## Training throughput (synthetic cache of random arrays)",
        "",
        "| preset | grid (S, H, W) | width | device | threads | batch | s / iteration | pairs / s "
        "| peak RSS MB | RSS +MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["throughput"]:
        lines.append(
            f"| {r['preset']} | {'x'.join(map(str, r['grid']))} | {r['width']} | {r['device']} "
            f"| {r['threads'] or '–'} | {r['batch']} "
            f"| {r['seconds_per_iteration']:.3f} | {r['pairs_per_second']:.1f} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_rss_increase_mb']:.0f} |"
        )
    for name, why in report["throughput_skipped"].items():
        lines.append(f"| {name} | | | | | | | | | {why} |")
    lines += [
        "",
        "One iteration = 2 critic updates + 1 generator update, each on a freshly drawn batch; pairs/s = batch × "
        "iterations / seconds (after one warm-up iteration).",
        "",
        "## Methods",
        "",
    ]
    for name in report["methods"]:
        lines.append(f"- **{name}**: {METHOD_DESCRIPTIONS[name]}")
    for name, why in report["skipped_methods"].items():
        lines.append(f"- **{name}**: not run — {why}")
    lines += [
        f"- elastix: {report['elastix']}",
        "",
        "Mutual-information settings, " + " ".join(report["settings"]["mi"].split()),
        "",
        f"Failures = pairs whose TRE is worse than at their start, including registrations that raised (those keep "
        f"the start). Memory: measured in a separate pass over the first {report['settings']['memory_cases']} "
        f"pair(s); peak Python MB = tracemalloc peak (Python and NumPy allocations only, not torch or ITK), "
        f"peak RSS +MB = {report['settings']['memory_method']}, above the level at the start of the method.",
        "",
    ]
    return lines


def _inputs_line(inputs: dict) -> str:
    line = (
        f"Timed pairs: MR {inputs['mr_megavoxels']:.2f} M voxels, TRUS {inputs['trus_megavoxels']:.2f} M voxels "
        "(mean)"
    )
    upsampled = [
        f"{what} to {inputs[key]:g} mm"
        for what, key in (("TRUS", "trus_spacing_mm"), ("MR in-plane", "mr_inplane_spacing_mm"))
        if inputs[key]
    ]
    return line + (", upsampled: " + ", ".join(upsampled) if upsampled else "") + "."


def _goal(proto: dict) -> dict | None:
    s = proto["methods"]
    if MI not in s:
        return None
    tre_ratio = s[AIR_ITER]["mean"] / s[MI]["mean"] if s[MI]["mean"] > 0 else None
    one = s[MI]["median_seconds"] / s[AIR_ONE]["median_seconds"]
    it = s[MI]["median_seconds"] / s[AIR_ITER]["median_seconds"]
    return {
        "tre_ratio": tre_ratio,
        "speedup_one_pass": one,
        "speedup_iterative": it,
        "accuracy_met": tre_ratio is not None and tre_ratio <= 0.5,
        "speed_met": one >= 20,
    }


def _figures(report: dict, out: Path) -> None:
    box_plots(
        {
            f"{key} TRE (mm)": {
                name: [r["tre_mm"] for r in proto["per_case"] if r["method"] == name]
                for name in proto["methods"]
            }
            for key, proto in report["protocols"].items()
        },
        out / "tre_boxplots.png",
        "TRE per method, same pairs and same starts",
    )
    d, t = [], []
    for proto in report["protocols"].values():
        for r in proto["per_case"]:
            if np.isfinite(r["d_score"]):
                d.append(r["d_score"])
                t.append(r["tre_mm"])
    rho = float(stats.spearmanr(d, t).statistic) if len(d) > 2 else float("nan")
    report["spearman_d_score_vs_tre"] = rho
    scatter(
        d,
        t,
        "AIR-net D-score",
        "TRE (mm)",
        out / "dscore_vs_tre.png",
        f"starts and every method's result, Spearman ρ = {rho:.2f}",
    )


def run_benchmark(
    data_root: Path,
    out: Path,
    model: Path | None = None,
    dofs: Sequence[int] = (3, 6),
    quick: bool = False,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
    device: str = "auto",
    elastix: bool = True,
    command: str | None = None,
    latency_only: bool = False,
    threads: Sequence[int] = (1, 2),
    batch: int = 16,
    bf16: bool = False,
    trus_spacing_mm: float | None = None,
    mr_inplane_mm: float | None = None,
) -> dict:
    """Run the benchmark and write ``benchmark.json``, ``benchmark.md``, ``tre_boxplots.png`` and
    ``dscore_vs_tre.png`` in ``out``; returns the report (the JSON's content plus ``markdown``).

    ``elastix=False`` skips elastix even when itk-elastix is installed (loading it takes tens of seconds).
    ``latency_only`` times AIR-net alone (no protocols, no training throughput, no figures), with ``threads``
    CPU thread counts, ``batch`` pairs in the batched rows (``bf16``: also under bf16 autocast), the images
    upsampled first when ``trus_spacing_mm`` / ``mr_inplane_mm`` are given (see :func:`upsampled_cases`).
    """
    t_start = time.perf_counter()
    out = Path(out)
    machine = machine_info()
    cases = data.load_dataset(Path(data_root), require_gt=True, progress=progress)
    if quick:
        cases = cases[:QUICK_CASES]
    n_lat, repeats = (2, 2) if quick else (5, 5)
    if trus_spacing_mm or mr_inplane_mm:
        cases = upsampled_cases(cases[:n_lat], trus_spacing_mm, mr_inplane_mm)
    registrar = Registrar.from_checkpoint(model, device, AIRNET_ITERATIONS)
    methods, skipped, elastix_note = build_methods(
        registrar, cases, quick, elastix and not latency_only, seed
    )
    memory_cases = 1 if quick else 3
    sections = {"setup": time.perf_counter() - t_start}
    protocols = {}
    for dof in () if latency_only else dofs:
        t0 = time.perf_counter()
        protocols[f"{dof}-DOF"] = run_protocol(dof, cases, methods, registrar, seed, memory_cases, progress)
        sections[f"{dof}-DOF"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    latency = []
    if registrar.device.type == "cpu":
        for n in threads:
            latency += airnet_latency(registrar, cases, n, n_lat, repeats, batch, bf16)
    else:
        latency += airnet_latency(registrar, cases, None, n_lat, repeats, batch, bf16)
    if torch.cuda.is_available() and registrar.device.type == "cpu" and not latency_only:
        gpu = Registrar.from_checkpoint(model, "cuda", AIRNET_ITERATIONS)
        latency += airnet_latency(gpu, cases, None, n_lat, repeats, batch, bf16)
    from .distributed import select_device

    sections["latency"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    throughput, throughput_skipped = (
        ([], {"all": "skipped with --latency-only"})
        if latency_only
        else throughput_table(select_device(device), quick, progress)
    )
    sections["throughput"] = time.perf_counter() - t0

    report = {
        "command": command
        or f"run_benchmark({str(data_root)!r}, {str(out)!r}, model={model!r}, dofs={tuple(dofs)}, "
        f"quick={quick}, seed={seed})",
        "argv": sys.argv,
        "data": str(data_root),
        "cases": len(cases),
        "quick": quick,
        "seed": seed,
        "machine": machine,
        "model": {
            "id": registrar.model_id,
            "sha256": registrar.model_sha256,
            "dof": registrar.config.dof,
            "grid": list(registrar.config.grid.size),
            "iterations": AIRNET_ITERATIONS,
        },
        "methods": list(methods) if protocols else [],
        "skipped_methods": skipped,
        "elastix": elastix_note,
        "settings": {
            "mi": __doc__.split("Mutual-information settings — ")[1].split("\n\n")[0],
            "mi_iterations_per_level": 20 if quick else 100,
            "elastix_iterations_per_level": 20 if quick else 250,
            "memory_cases": memory_cases,
            "memory_method": _memory_method(),
        },
        "protocols": protocols,
        "latency": latency,
        "throughput": throughput,
        "throughput_skipped": throughput_skipped,
        "inputs": _input_sizes(cases[:n_lat], trus_spacing_mm, mr_inplane_mm),
    }
    report["goal"] = {k: g for k, p in protocols.items() if (g := _goal(p)) is not None}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if protocols:
        _figures(report, out)
    sections["figures"] = time.perf_counter() - t0
    report["section_seconds"] = sections
    report["seconds"] = time.perf_counter() - t_start
    text = markdown(report)
    write_json(out / "benchmark.json", report, undefined_as_null=True, default=_json_default)
    write_text(out / "benchmark.md", text)
    report["markdown"] = text
    return report


def _input_sizes(cases: Sequence[data.Case], trus_mm: float | None, mr_inplane_mm: float | None) -> dict:
    """Voxel counts of the timed pairs' images (mean), and the upsampling asked for."""
    return {
        "mr_megavoxels": float(np.mean([np.prod(c.mr.GetSize()) for c in cases])) / 1e6,
        "trus_megavoxels": float(np.mean([np.prod(c.trus.GetSize()) for c in cases])) / 1e6,
        "trus_spacing_mm": trus_mm,
        "mr_inplane_spacing_mm": mr_inplane_mm,
    }


def _memory_method(fallback: bool = False) -> str:
    if not fallback and Path("/proc/self/clear_refs").exists():
        return "peak resident set (VmHWM, reset through /proc/self/clear_refs)"
    return "growth of ru_maxrss (0 when an earlier step had a higher peak)"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def command_line(args) -> str:
    """The ``airreg benchmark`` command equivalent to parsed arguments (for the report)."""
    parts = ["airreg", "benchmark", "--data", str(args.data), "--out", str(args.out)]
    if args.model:
        parts += ["--model", str(args.model)]
    if not getattr(args, "scorecard", False):  # the scorecard uses each model's own protocol
        parts += ["--dof", str(args.dof)]
    parts += ["--seed", str(args.seed)]
    if args.quick:
        parts.append("--quick")
    if args.device != "auto":
        parts += ["--device", args.device]
    if args.no_elastix:
        parts.append("--no-elastix")
    if args.latency_only:
        parts.append("--latency-only")
    if list(args.threads) != [1, 2]:
        parts += ["--threads", *map(str, args.threads)]
    if args.batch != 16:
        parts += ["--batch", str(args.batch)]
    if args.bf16:
        parts.append("--bf16")
    if args.trus_spacing:
        parts += ["--trus-spacing", f"{args.trus_spacing:g}"]
    if args.mr_inplane_spacing:
        parts += ["--mr-inplane-spacing", f"{args.mr_inplane_spacing:g}"]
    if getattr(args, "scorecard", False):
        parts.append("--scorecard")
    return shlex.join(parts)
