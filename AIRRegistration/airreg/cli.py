"""The ``airreg`` command line: a thin layer over the Python API, one public call per subcommand.

Errors in the input (AirRegError) are printed as one line and exit with status 2; nothing is written half-way.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import AirRegError, InputError
from .fileio import check_distinct, check_name, check_writable, output_set, write_json

DISCLAIMER = (
    "The bundled model was trained on synthetic phantoms only: it is not for clinical use until trained and "
    "validated on your own data."
)


def build_parser() -> argparse.ArgumentParser:
    from .config import PAPER_ROTATION_DEG, PAPER_TRANSLATION_MM

    parser = argparse.ArgumentParser(
        prog="airreg", description="AIR-net MR-TRUS rigid registration with a quality score."
    )
    parser.add_argument("--version", action="version", version=f"airreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write synthetic MR/TRUS phantom cases in the case-folder format")
    p.add_argument("--out", type=Path, required=True, help="output folder (one subfolder per case)")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deform", action="store_true", help="add a mild probe-pressure deformation to the TRUS")
    p.add_argument(
        "--family",
        choices=("classic", "synth", "mixture"),
        default="classic",
        help="classic: the anatomical phantom; synth: label-driven, randomised (docs/phantoms.md); "
        "mixture: even cases classic, odd cases synth",
    )
    p.add_argument(
        "--preview", action="store_true", help="also write preview.png (MR grey, TRUS colour) per case"
    )

    p = sub.add_parser("train", help="train AIR-net on case folders (runs under torchrun unchanged)")
    p.add_argument("--data", type=Path, required=True, help="folder of case folders, or a µRegPro folder")
    p.add_argument(
        "--out", type=Path, required=True, help="run folder: checkpoints, log.csv, loss_curves.png, model.pt"
    )
    p.add_argument(
        "--preset",
        default="default",
        help="paper, default, tiny or general (default + augmentation)",
    )
    p.add_argument(
        "--dof",
        type=int,
        choices=(3, 6),
        default=3,
        help="3: axial rotation + in-plane shift (paper); 6: rigid",
    )
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (split across processes)")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="0: one pass over the training cases")
    p.add_argument("--lr-g", type=float, help="generator learning rate (3e-4; a tenth with --init-from)")
    p.add_argument("--lr-d", type=float, help="critic learning rate (1e-4; a tenth with --init-from)")
    p.add_argument(
        "--lambda-param", type=float, default=1.0, help="weight of the parameter distance in G's loss"
    )
    p.add_argument(
        "--grid-size",
        type=int,
        nargs=3,
        metavar=("S", "H", "W"),
        help="network grid: slices, rows, columns (default: the preset's)",
    )
    p.add_argument(
        "--grid-spacing",
        type=float,
        nargs=3,
        metavar=("S", "H", "W"),
        help="mm between slices, rows, columns (default: the preset's)",
    )
    p.add_argument(
        "--rotation-deg",
        type=float,
        default=PAPER_ROTATION_DEG,
        help="training starts: rotations uniform in +- this (degrees; default: the paper's 25)",
    )
    p.add_argument(
        "--translation-mm",
        type=float,
        default=PAPER_TRANSLATION_MM,
        help="training starts: translations uniform in +- this (mm; default: the paper's 5)",
    )
    p.add_argument(
        "--d-fakes", choices=("all", "estimates"), default="all", help="what D is shown as misaligned"
    )
    p.add_argument(
        "--critic-constraint",
        choices=("clip", "gp"),
        default="clip",
        help="clip: weight clipping (paper); gp: gradient penalty (WGAN-GP)",
    )
    p.add_argument("--gp-weight", type=float, default=10.0, help="weight of the gradient penalty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="intensity augmentation of the batches (gamma, bias, blur, noise, MR inversion); default: the "
        "preset's (on for general only)",
    )
    p.add_argument("--resume", type=Path, help="continue from a training checkpoint (last.pt)")
    p.add_argument(
        "--init-from",
        help="fine-tune: start from a trained model (file, or bundled name phantom-3dof / phantom-6dof) with the "
        "fine-tune learning-rate schedule (docs/training.md)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")

    p = sub.add_parser(
        "calibrate", help="recompute a model's quality calibration (D-score -> expected error)"
    )
    p.add_argument("--model", type=Path, required=True, help="model file to calibrate")
    p.add_argument("--data", type=Path, required=True, help="case folders with ground truth")
    p.add_argument("--out", type=Path, required=True, help="calibrated model file to write")
    p.add_argument(
        "--split",
        choices=("val", "all"),
        default="val",
        help="val: the validation cases of the training split (default); all: every case",
    )
    p.add_argument(
        "--statistic",
        choices=("critic", "contrast"),
        default=None,
        help="D's statistic: critic (its raw value, fastest) or contrast; default: the one that flags best",
    )
    p.add_argument("--device", default="auto")

    p = sub.add_parser(
        "add-refiner",
        help="a cascade: a model with a second generator (trained on small starts) for the passes after the first",
    )
    p.add_argument(
        "--model", type=Path, required=True, help="the model (file or bundled name): G, D and checks"
    )
    p.add_argument(
        "--refiner",
        type=Path,
        required=True,
        help="a model trained with the same DOF on small starts (airreg train --rotation-deg 10 "
        "--translation-mm 4); its generator is kept",
    )
    p.add_argument("--out", type=Path, required=True, help="model file to write")

    p = sub.add_parser(
        "export", help="an inference copy of a model: no optimiser state, optionally half the size"
    )
    p.add_argument(
        "--model", type=Path, required=True, help="model or training checkpoint (file or bundled name)"
    )
    p.add_argument("--out", type=Path, required=True, help="model file to write")
    p.add_argument(
        "--float16",
        action="store_true",
        help="store the weights in half precision (the networks still compute in float32)",
    )

    p = sub.add_parser(
        "refine-critic",
        help="train D alone against a trained model's frozen G, then recalibrate (a sharper D-score)",
    )
    _frozen_generator_arguments(
        p, "model file from airreg train", "model file to write (G unchanged, new D)", "critic updates"
    )
    p.add_argument(
        "--objective",
        choices=("rank", "wgan"),
        default="rank",
        help="rank: order alignments by TRE (default); wgan: the adversarial critic loss",
    )
    p.add_argument(
        "--constraint", choices=("gp", "clip"), default="gp", help="critic constraint for --objective wgan"
    )
    p.add_argument(
        "--other-patient",
        choices=("as-given", "registered"),
        default="as-given",
        help="how --objective rank shows another patient's TRUS: as given, or also after G registered it",
    )
    p.add_argument("--fresh", action="store_true", help="start from new critic weights, not the model's D")

    p = sub.add_parser(
        "train-patient-check",
        help="train a model's patient check: does the TRUS belong to the MR's patient? (G and D unchanged)",
    )
    _frozen_generator_arguments(
        p,
        "model file from airreg train or refine-critic",
        "model file to write (with the patient check)",
        "updates of the patient check",
    )
    p.add_argument(
        "--false-alarm",
        type=float,
        default=0.05,
        help="share of same-patient registrations of the validation cases that the threshold flags",
    )

    p = sub.add_parser(
        "calibrate-ood",
        help="fit a model's input check: are the images unlike its training data? (networks unchanged)",
    )
    p.add_argument("--model", type=Path, required=True, help="model file or bundled model name")
    p.add_argument(
        "--data", type=Path, required=True, help="case folders of the model's training family (the reference)"
    )
    p.add_argument("--out", type=Path, required=True, help="model file to write (with the input check)")
    p.add_argument(
        "--held-out", type=Path, help="case folders of other families: only counted (how many are flagged)"
    )
    p.add_argument(
        "--pass-rate",
        type=float,
        default=0.95,
        help="share of training-family cases (leave-one-out) that the threshold lets pass",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts the cases are seen from")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("register", help="register a TRUS volume (moving) to an MR volume (fixed)")
    _pair_arguments(p)
    p.add_argument(
        "--init", type=Path, help="initial MR->TRUS transform (ITK file); default: volume centres aligned"
    )
    p.add_argument("--out-transform", type=Path, required=True, help="ITK transform file (.tfm, .txt, .h5)")
    p.add_argument("--report", type=Path, help="JSON report")
    p.add_argument("--ras-matrix", type=Path, help="also write Slicer's 4x4 RAS 'to parent' matrix as text")
    p.add_argument("--overlay", type=Path, help="PNG overlay before/after")
    p.add_argument("--iterations", type=int, default=3, help="generator passes; D keeps the best-scored step")
    p.add_argument(
        "--targets", type=Path, help="MR target points: CSV (label,x,y,z, frame declared) or Slicer .mrk.json"
    )
    p.add_argument(
        "--out-targets", type=Path, help="the targets in TRUS space: .csv (LPS and RAS columns) or .mrk.json"
    )
    p.add_argument("--segmentation", type=Path, help="label map on the MR (.nrrd, .nii.gz ...)")
    p.add_argument(
        "--out-segmentation", type=Path, help="the label map on the TRUS grid (.nrrd, .nii, .nii.gz, .mha)"
    )

    p = sub.add_parser("score", help="D-score and quality flag of a given alignment")
    _pair_arguments(p)
    p.add_argument("--transform", type=Path, required=True, help="MR->TRUS transform to judge (ITK file)")

    p = sub.add_parser(
        "evaluate", help="the paper's protocol on cases with ground truth: TRE and D-score before/after"
    )
    p.add_argument("--data", type=Path, required=True)
    _model_argument(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dof", type=int, choices=(3, 6), help="perturbation protocol (default: the model's)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234, help="seed of the random starts (same for every method)")
    p.add_argument("--tolerance", type=float, default=5.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--overlays", type=int, default=3, help="number of cases drawn as Fig. 3-style overlays")

    p = sub.add_parser(
        "demo", help="register a synthetic phantom pair with the bundled model (the README's first command)"
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--seed", type=int, default=20261125, help="phantom seed (never used in training)")
    _model_argument(p)
    p.add_argument("--device", default="auto")

    p = sub.add_parser(
        "benchmark",
        help="AIR-net against mutual information, elastix and simple baselines: TRE, time, memory, throughput",
    )
    p.add_argument("--data", type=Path, required=True, help="held-out cases with ground truth")
    p.add_argument("--out", type=Path, required=True, help="folder for benchmark.json, benchmark.md and PNGs")
    _model_argument(p)
    p.add_argument("--dof", choices=("3", "6", "both"), default="both", help="start protocol(s)")
    p.add_argument("--quick", action="store_true", help="3 cases, short optimisations (a smoke test)")
    p.add_argument("--seed", type=int, default=4242, help="seed of the random starts (same for every method)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (for AIR-net)")
    p.add_argument("--no-elastix", action="store_true", help="skip elastix even if itk-elastix is installed")
    p.add_argument("--latency-only", action="store_true", help="time AIR-net alone (no methods, no training)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to time")
    p.add_argument("--batch", type=int, default=16, help="pairs per batch in the batched latency rows")
    p.add_argument("--bf16", action="store_true", help="also time the batched networks under bf16 autocast")
    p.add_argument("--trus-spacing", type=float, help="upsample the timed TRUS volumes to this isotropic mm")
    p.add_argument("--mr-inplane-spacing", type=float, help="upsample the timed MRs in-plane to this mm")
    p.add_argument(
        "--scorecard",
        action="store_true",
        help="the goals' figures side by side: TRE, flag AUROC, latency, speed against MI and training time "
        "of --model, or of both bundled models (airreg/scorecard.py)",
    )
    return parser


def _frozen_generator_arguments(
    p: argparse.ArgumentParser, model_help: str, out_help: str, steps_help: str
) -> None:
    """The options of the commands that train a network judging a trained model's frozen G."""
    p.add_argument("--model", type=Path, required=True, help=model_help)
    p.add_argument("--data", type=Path, required=True, help="the training data (same split is used)")
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument("--steps", type=int, default=3000, help=steps_help)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--check-every", type=int, default=500, help="steps between validation AUROC checks")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")


def _model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        help="model file, or the name of a bundled model: phantom-3dof (default) or phantom-6dof "
        "(both trained on synthetic phantoms only)",
    )


def _pair_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mr", type=Path, required=True, help="MR volume (fixed): any SimpleITK format or a DICOM folder"
    )
    p.add_argument("--trus", type=Path, required=True, help="TRUS volume (moving)")
    _model_argument(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--tolerance", type=float, default=5.0, help="error (mm) above which the result is flagged"
    )


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import generate_dataset, write_preview

    folders = generate_dataset(args.out, args.cases, args.seed, deform=args.deform, family=args.family)
    if args.preview:
        for folder in folders:
            write_preview(folder, folder / "preview.png")
    print(f"wrote {len(folders)} cases to {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .config import PRESET_TRAINING, TrainConfig, fine_tune_schedule, preset, with_grid
    from .training import train

    augment = (
        PRESET_TRAINING.get(args.preset, {}).get("augment", False) if args.augment is None else args.augment
    )
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        lambda_param=args.lambda_param,
        rotation_deg=args.rotation_deg,
        translation_mm=args.translation_mm,
        d_fakes=args.d_fakes,
        critic_constraint=args.critic_constraint,
        gp_weight=args.gp_weight,
        seed=args.seed,
        amp=not args.no_amp,
        compile=args.compile,
        num_threads=args.threads,
        augment=augment,
    )
    if args.init_from is not None:
        cfg = fine_tune_schedule(cfg)
    cfg = replace(cfg, **{k: v for k, v in (("lr_g", args.lr_g), ("lr_d", args.lr_d)) if v is not None})
    model_config = with_grid(preset(args.preset, args.dof), args.grid_size, args.grid_spacing)
    model = train(args.data, args.out, model_config, cfg, args.resume, args.device, init_from=args.init_from)
    if os.environ.get("RANK", "0") == "0":
        print(f"model written to {model}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .training import recalibrate

    print(
        "calibrated model written to "
        f"{recalibrate(args.model, args.data, args.out, args.split, args.device, statistic=args.statistic)}"
    )
    return 0


def _cmd_add_refiner(args: argparse.Namespace) -> int:
    from .refiner import attach

    print(f"model with the refiner written to {attach(args.model, args.refiner, args.out)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_for_inference, load, save

    precision = "float16" if args.float16 else "as stored"
    path = save(args.out, export_for_inference(load(args.model), float16=args.float16))
    print(f"model written to {path} (weights {precision})")
    return 0


def _cmd_calibrate_ood(args: argparse.Namespace) -> int:
    from .ood_calibration import calibrate_ood

    summary = calibrate_ood(
        args.model, args.data, args.out, args.held_out, args.pass_rate, args.seed, args.device
    )
    check = summary.check
    passed = int((summary.reference_statistics <= check.threshold).sum())
    print(
        f"input check: threshold {check.threshold:.2f}; {passed} of {check.reference_cases} reference cases "
        f"pass (leave-one-out, {check.pass_rate:.0%})"
    )
    if check.held_out_cases:
        print(f"held-out cases flagged: {check.held_out_flagged} of {check.held_out_cases}")
    print(f"model with the input check written to {summary.path}")
    return 0


def _use_threads(threads: int) -> None:
    """Set torch's CPU threads when asked (0 keeps torch's default); torch is imported only when a command runs."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _cmd_refine_critic(args: argparse.Namespace) -> int:
    from .config import CriticConstraint, CriticObjective, OtherPatientPairs
    from .training import refine_critic

    _use_threads(args.threads)
    path = refine_critic(
        args.model,
        args.data,
        args.out,
        args.steps,
        CriticObjective(args.objective),
        CriticConstraint(args.constraint),
        lr_d=args.lr,
        batch_size=args.batch_size,
        fresh=args.fresh,
        check_every=args.check_every,
        device=args.device,
        other_patient=OtherPatientPairs(args.other_patient),
    )
    print(f"model with the refined critic written to {path}")
    return 0


def _cmd_train_patient_check(args: argparse.Namespace) -> int:
    from .patient_check_training import train_patient_check

    _use_threads(args.threads)
    path = train_patient_check(
        args.model,
        args.data,
        args.out,
        args.steps,
        false_alarm=args.false_alarm,
        lr=args.lr,
        batch_size=args.batch_size,
        check_every=args.check_every,
        device=args.device,
    )
    print(f"model with the patient check written to {path}")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from .data import read_image
    from .geometry import read_transform, write_matrix_text, write_transform
    from .registration import Registrar
    from .targets import TargetFiles, coverage_warnings

    target_files = TargetFiles.read(args.targets, args.out_targets, args.segmentation, args.out_segmentation)
    mr, trus = read_image(args.mr, "MR image"), read_image(args.trus, "TRUS image")
    initial = read_transform(args.init) if args.init else None
    registrar = Registrar.from_checkpoint(args.model, args.device, args.iterations, args.tolerance)
    result = registrar.register(mr, trus, initial)
    write_transform(args.out_transform, result.mr_to_trus)
    if args.ras_matrix:
        write_matrix_text(args.ras_matrix, result.mr_to_trus)
    mapped = target_files.write(result.mr_to_trus, trus)
    if args.report:
        write_json(args.report, {**result.report(str(args.out_transform)), **mapped})
    if args.overlay:
        from .evaluation import overlay_png

        overlay_png(
            registrar, mr, trus, [("before", result.initial), ("after", result.mr_to_trus)], args.overlay
        )
    _print_verdict(result.after, f"D-score {result.d_score_before:.2f} -> {result.d_score:.2f}", registrar)
    if result.single_pass_reason:
        print(f"note: {result.single_pass_reason}")
    for line in coverage_warnings(mapped):
        print(f"WARNING: {line}")
    if _is_bundled(args.model):
        print(DISCLAIMER)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .data import read_image
    from .geometry import read_transform
    from .registration import Registrar

    mr, trus = read_image(args.mr, "MR image"), read_image(args.trus, "TRUS image")
    registrar = Registrar.from_checkpoint(args.model, args.device, tolerance_mm=args.tolerance)
    verdict = registrar.score(mr, trus, read_transform(args.transform))
    _print_verdict(verdict, f"D-score {verdict.d_score:.2f}", registrar)
    if _is_bundled(args.model):
        print(DISCLAIMER)
    return 0


def _is_bundled(model: Path | None) -> bool:
    """Whether a --model value names one of the models trained on phantoms that ship with the package."""
    from .checkpoint import default_model_path, resolve

    return resolve(model).parent == default_model_path().parent


def _print_verdict(verdict, head: str, registrar) -> None:
    score = verdict.same_patient_score
    same = "" if score is None else f"; same-patient score {score:.2f}"
    print(f"{head}; estimated error {verdict.estimated_tre_mm:.1f} mm{same}; quality: {verdict.quality}")
    inputs = verdict.input_check
    if inputs is None:
        print("input check: unavailable (the model file has none; airreg calibrate-ood adds one)")
    else:
        state = "out of distribution" if inputs.out_of_distribution else "in distribution"
        print(f"input check: statistic {inputs.statistic:.2f}, threshold {inputs.threshold:.2f}: {state}")
    if verdict.warning:
        print(f"WARNING: {verdict.warning}")
    if registrar.flag_note:
        print(f"WARNING: {registrar.flag_note}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    summary = evaluate(
        args.data,
        args.out,
        args.model,
        dof=args.dof,
        iterations=args.iterations,
        seed=args.seed,
        tolerance_mm=args.tolerance,
        device=args.device,
        overlays=args.overlays,
    )
    print(summary["markdown"])
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .evaluation import demo

    report = demo(args.out, args.seed, args.model, args.device)
    print(
        f"TRE {report['tre_mm_before']:.2f} mm -> {report['tre_mm_after']:.2f} mm; D-score "
        f"{report['d_score_before']:.2f} -> {report['d_score']:.2f}; quality: {report['quality']}; "
        f"{report['seconds'] * 1000:.0f} ms"
    )
    print(f"wrote {args.out}/: transform.tfm, transform_ras.txt, report.json, overlay.png, case/")
    print(DISCLAIMER)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import command_line, run_benchmark

    if args.scorecard:
        return _scorecard(args, command_line(args))
    report = run_benchmark(
        args.data,
        args.out,
        args.model,
        dofs=(3, 6) if args.dof == "both" else (int(args.dof),),
        quick=args.quick,
        seed=args.seed,
        device=args.device,
        elastix=not args.no_elastix,
        command=command_line(args),
        latency_only=args.latency_only,
        threads=args.threads,
        batch=args.batch,
        bf16=args.bf16,
        trus_spacing_mm=args.trus_spacing,
        mr_inplane_mm=args.mr_inplane_spacing,
    )
    print(report["markdown"])
    figures = "" if args.latency_only else ", tre_boxplots.png, dscore_vs_tre.png"
    print(f"wrote {args.out}/: benchmark.json, benchmark.md{figures}")
    return 0


def _scorecard(args: argparse.Namespace, command: str) -> int:
    from .scorecard import BUNDLED, run_scorecard, write_scorecard

    fixed = {
        "--latency-only": args.latency_only,
        "--bf16": args.bf16,
        "--trus-spacing": args.trus_spacing,
        "--mr-inplane-spacing": args.mr_inplane_spacing,
        "--dof": args.dof != "both",
    }
    clashing = [name for name, given in fixed.items() if given]
    if clashing:
        raise InputError(f"--scorecard sets its own protocol and timings; drop {', '.join(clashing)}")
    models = [args.model] if args.model else list(BUNDLED)
    report = run_scorecard(args.data, models, args.seed, args.device, args.quick)
    print(write_scorecard(report, args.out, command))
    print(f"wrote {args.out}/: benchmark.json, benchmark.md, tre_boxplots.png")
    return 0


COMMANDS = {
    "phantom": _cmd_phantom,
    "train": _cmd_train,
    "calibrate": _cmd_calibrate,
    "calibrate-ood": _cmd_calibrate_ood,
    "add-refiner": _cmd_add_refiner,
    "export": _cmd_export,
    "register": _cmd_register,
    "score": _cmd_score,
    "refine-critic": _cmd_refine_critic,
    "train-patient-check": _cmd_train_patient_check,
    "evaluate": _cmd_evaluate,
    "demo": _cmd_demo,
    "benchmark": _cmd_benchmark,
}


#: Files each command writes into its --out folder (checked against the inputs before anything runs).
FOLDER_OUTPUTS = {
    "train": ("model.pt", "log.csv", "loss_curves.png"),  # not last.pt: resuming from it is the normal use
    "evaluate": ("cases.csv", "summary.json", "summary.md", "boxplots.png", "dscore_vs_tre.png"),
    "demo": ("transform.tfm", "transform_ras.txt", "report.json", "overlay.png", "case"),
    "benchmark": ("benchmark.json", "benchmark.md", "tre_boxplots.png", "dscore_vs_tre.png"),
}
#: Files written beside a model file's --out (suffixes of its stem), by the commands that write a model.
MODEL_SIDE_OUTPUTS = {
    "refine-critic": ("-critic-log.csv", "-critic-curves.png"),
    "train-patient-check": ("-patient-check-log.csv", "-patient-check-curves.png"),
}
#: Commands whose outputs are published together only when the whole run succeeds (see fileio.output_set);
#: train keeps its checkpoints as it goes (for --resume) and phantom reads back each case it writes.
OUTPUT_SET_COMMANDS = frozenset(
    {
        "register",
        "calibrate",
        "calibrate-ood",
        "add-refiner",
        "export",
        "refine-critic",
        "train-patient-check",
        "evaluate",
        "demo",
        "benchmark",
    }
)


def _inputs(args: argparse.Namespace) -> dict[str, Path | None]:
    """The input paths of a parsed command, keyed by their option."""
    names = (
        "mr",
        "trus",
        "init",
        "transform",
        "data",
        "resume",
        "held_out",
        "targets",
        "segmentation",
        "refiner",
    )
    found = {f"--{n}": getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if hasattr(args, "model"):
        from .checkpoint import resolve

        found["--model"] = resolve(args.model)
    return found


def _outputs(args: argparse.Namespace) -> dict[str, Path | None]:
    """The output files of a parsed command, keyed by their option (and file name, for an --out folder)."""
    if args.command == "register":
        names = ("out_transform", "report", "ras_matrix", "overlay", "out_targets", "out_segmentation")
        return {"--" + n.replace("_", "-"): getattr(args, n) for n in names}
    if args.command in FOLDER_OUTPUTS:
        return {f"--out ({name})": args.out / name for name in FOLDER_OUTPUTS[args.command]}
    if args.command in ("calibrate", "calibrate-ood", "add-refiner", "export", *MODEL_SIDE_OUTPUTS):
        side = MODEL_SIDE_OUTPUTS.get(args.command, ())
        return {
            "--out": args.out,
            **{f"--out ({s[1:]})": args.out.with_name(args.out.stem + s) for s in side},
        }
    return {}


def _check_pair(args: argparse.Namespace) -> None:
    """Refuse an MR and a TRUS that are the same file, or two files with the same content."""
    if not (hasattr(args, "mr") and args.mr.exists() and args.trus.exists()):
        return
    same = args.mr.resolve() == args.trus.resolve() or os.path.samefile(args.mr, args.trus)
    if (
        not same
        and args.mr.is_file()
        and args.trus.is_file()
        and args.mr.stat().st_size == args.trus.stat().st_size
    ):
        same = _sha256(args.mr) == _sha256(args.trus)
    if same:
        raise InputError(f"{args.trus}: --trus is the same image as --mr ({args.mr}); give the TRUS volume")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be refused before a command runs: file names, outputs that would overwrite an input
    or each other, outputs that cannot be written, the same image given twice, the device."""
    if getattr(args, "out", None) is not None:
        check_name(args.out, "--out")
    outputs = _outputs(args)
    check_distinct(_inputs(args), outputs)
    if args.command == "phantom":  # a folder of case folders: the first case's last file stands for them
        check_writable(args.out / "case0000" / "case.json")
    for path in outputs.values():
        if path is not None:
            check_writable(path)
    if args.command == "register":
        from .geometry import check_transform_suffix

        check_transform_suffix(args.out_transform)
    _check_pair(args)
    if hasattr(args, "device"):
        from .distributed import check_device_name

        check_device_name(args.device)


def _close_progress_bars() -> None:
    """End any open tqdm bar (on its own line) so that an error message starts on a new line."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            bar.close()


def _terminate(signum: int, frame) -> None:
    """SIGTERM unwinds like an error, so temporary files and unpublished outputs are removed."""
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, then run the command (its outputs as one set where it has several)."""
    check_arguments(args)
    if args.command not in OUTPUT_SET_COMMANDS:
        return COMMANDS[args.command](args)
    with output_set():
        return COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (2 for bad input)."""
    for stream in (sys.stdout, sys.stderr):  # reports hold non-ASCII (ρ, µ, ±): never crash on a C locale
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    args = build_parser().parse_args(argv)
    catch_term = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if catch_term else None
    try:
        return run(args)
    except (AirRegError, OSError) as exc:  # OSError: an output that cannot be written (disk full ...)
        _close_progress_bars()
        print(f"airreg {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"airreg {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if catch_term:
            signal.signal(signal.SIGTERM, previous)


def _one_line(exc: Exception) -> str:
    """An exception's message on one line (file names may hold newlines)."""
    return " ".join(str(exc).splitlines())


if __name__ == "__main__":
    raise SystemExit(main())
