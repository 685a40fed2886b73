"""Frozen configuration of models and training, with the presets; saved in every checkpoint.

Presets:

* ``paper``   — the paper's size: 256x256 in-plane, 26 slices, 128 filters (needs a GPU to train).
* ``default`` — 48x48 in-plane at 1.6 mm (77 mm), 16 slices at 3 mm, 32 filters: trains on a laptop CPU.
* ``tiny``    — a 24x24x6 grid and 8 filters, for tests and smoke runs only.
* ``general`` — the ``default`` model trained with intensity augmentation (:data:`PRESET_TRAINING`), meant for a
  mixture of phantom families (docs/phantoms.md).

``airreg train --grid-size/--grid-spacing`` replaces a preset's grid (e.g. a cascade's refiner with thinner
slices, docs/training.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum

from .errors import InputError
from .resampling import GridSpec

#: Rotation (degrees) and translation (mm) ranges of the training perturbations (paper, section 3.1).
PAPER_ROTATION_DEG = 25.0
PAPER_TRANSLATION_MM = 5.0


class DiscriminatorFakes(str, Enum):
    """Which misaligned pairs the critic is shown as "fake".

    ``estimates``: only G's outputs (the paper's reading). ``all`` (our default): a quarter G's outputs, half
    misalignments of random size (0 to 2x the perturbation range, for a graded score) and a quarter gross failures
    (another case's TRUS, swapped modalities, blank TRUS), so that D can flag failures of every size.
    """

    ESTIMATES = "estimates"
    ALL = "all"


class CriticConstraint(str, Enum):
    """How the critic is kept Lipschitz, which WGAN needs.

    ``clip`` (the paper): weights clipped to ±``clip`` after each RMSprop update. ``gp``: a gradient penalty
    ``gp_weight · (‖∇D(x̂)‖ - 1)²`` on random interpolates x̂ between aligned and fake pairs (WGAN-GP, Gulrajani
    et al. 2017), Adam with β = (0.5, 0.9). The penalty frees the capacity that clipping takes from the critic,
    but in our experiments it did not by itself make the D-score rank errors across cases (docs/method.md); that
    is what :class:`CriticObjective` ``rank`` is for.
    """

    CLIP = "clip"
    GP = "gp"


class CriticObjective(str, Enum):
    """What a critic refinement (``airreg refine-critic``, G frozen) optimises.

    ``wgan``: the adversarial critic loss of training, with the chosen constraint. ``rank`` (default): the
    ordering of alignments by TRE (RankNet): a graded misalignment of one case against the perturbed start of
    another, D scoring the smaller TRE higher. The D-score must rank alignments across cases, which the WGAN
    loss does not ask for (a per-case offset costs it nothing); docs/method.md compares the two.
    """

    WGAN = "wgan"
    RANK = "rank"


class OtherPatientPairs(str, Enum):
    """How the ``rank`` refinement shows D another patient's TRUS (a gross failure, ranked last).

    ``as-given`` (default): one pair in eight, the other TRUS placed as given (volume centres).
    ``registered``: one pair in eight as given, and one in four after G registered the other TRUS to the MR,
    against the same MR with its own TRUS; the calibration then includes such pairs too. Once G has aligned the
    glands only the anatomy inside tells the two apart. Measured on phantoms (BENCHMARKS.md): a better flag
    for the 6-DOF model, a worse one for the 3-DOF model; either way D catches few such registrations.
    """

    AS_GIVEN = "as-given"
    REGISTERED = "registered"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and the grid it sees; everything inference needs to rebuild the networks."""

    dof: int = 3
    grid: GridSpec = field(default_factory=GridSpec)
    width: int = 32
    hidden: int = 256
    bottleneck: int = 8

    def __post_init__(self) -> None:
        if self.dof not in (3, 6):
            raise InputError(f"model config: dof must be 3 or 6, got {self.dof}")
        if isinstance(self.grid, dict):
            object.__setattr__(self, "grid", GridSpec(**self.grid))

    @property
    def parameter_scale(self) -> tuple[float, ...]:
        """Typical magnitude of each parameter (degrees, mm): the generator's output scale."""
        rot, trans = PAPER_ROTATION_DEG, PAPER_TRANSLATION_MM
        return (rot, trans, trans) if self.dof == 3 else (rot, rot, rot, trans, trans, trans)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return cls(**{**data, "grid": GridSpec(**data["grid"])})


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (paper section 2.2 where it states them; our choices documented otherwise)."""

    epochs: int = 40
    batch_size: int = 32
    steps_per_epoch: int = 0  # 0: one pass over the training cases per epoch (rounded up to whole batches)
    lr_g: float = 3e-4
    lr_d: float = 1e-4
    cosine_lr: bool = (
        True  # learning rates decay along a cosine to 5 % over the epochs (stateless: resumes exactly)
    )
    n_critic: int = 2  # paper: G is updated once per two D updates
    critic_constraint: CriticConstraint = CriticConstraint.CLIP
    clip: float = 0.01  # paper: critic weights clipped to +-0.01 (WGAN)
    gp_weight: float = 10.0  # weight of the gradient penalty when critic_constraint is "gp"
    lambda_param: float = 1.0  # weight of the parameter distance in G's loss
    adversarial_weight: float = 1.0  # weight of -D(x_est) in G's loss
    rotation_radius_mm: float = 25.0  # converts rotation error (rad) to mm in the parameter distance
    rotation_deg: float = PAPER_ROTATION_DEG
    translation_mm: float = PAPER_TRANSLATION_MM
    d_fakes: DiscriminatorFakes = DiscriminatorFakes.ALL
    val_fraction: float = 1 / 6  # paper: 5:1 train/validation split, by case
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA only; CPU always runs in float32
    compile: bool = False  # torch.compile the networks (CUDA)
    num_threads: int = 0  # torch intra-op threads on CPU; 0 leaves torch's default
    augment: bool = False  # intensity augmentation of each batch (airreg.augmentation); geometry unchanged
    lr_warmup_epochs: int = 0  # linear warm-up of the learning rates over the first epochs (fine-tuning)

    def __post_init__(self) -> None:
        if isinstance(self.d_fakes, str):
            object.__setattr__(self, "d_fakes", DiscriminatorFakes(self.d_fakes))
        if isinstance(self.critic_constraint, str):
            object.__setattr__(self, "critic_constraint", CriticConstraint(self.critic_constraint))
        if self.batch_size < 1 or self.epochs < 1 or self.n_critic < 1:
            raise InputError("training config: epochs, batch_size and n_critic must be >= 1")
        if not (self.rotation_deg > 0 and self.translation_mm > 0):
            raise InputError(
                "training config: rotation_deg and translation_mm (the range of the training starts) must be > 0"
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["d_fakes"] = self.d_fakes.value
        data["critic_constraint"] = self.critic_constraint.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**data)


#: A fine-tune (``airreg train --init-from``) starts from trained weights: this share of the learning rates.
FINE_TUNE_LR_SCALE = 0.1


def fine_tune_schedule(cfg: TrainConfig) -> TrainConfig:
    """The learning-rate schedule of a fine-tune: a tenth of the rates, warmed up over the first tenth of the
    epochs (at least one), then the usual cosine decay. Large updates would first undo what the trained weights
    know; the warm-up lets Adam's fresh moment estimates settle before full steps."""
    scale = FINE_TUNE_LR_SCALE
    return replace(
        cfg, lr_g=cfg.lr_g * scale, lr_d=cfg.lr_d * scale, lr_warmup_epochs=max(1, cfg.epochs // 10)
    )


PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(grid=GridSpec((26, 256, 256), (3.0, 0.6, 0.6)), width=128),
    "default": ModelConfig(grid=GridSpec((16, 48, 48), (3.0, 1.6, 1.6)), width=32),
    "tiny": ModelConfig(grid=GridSpec((6, 24, 24), (6.0, 3.5, 3.5)), width=8, hidden=32),
    "general": ModelConfig(grid=GridSpec((16, 48, 48), (3.0, 1.6, 1.6)), width=32),
}

#: Training settings a preset turns on besides its model (``airreg train`` options override them).
PRESET_TRAINING: dict[str, dict] = {"general": {"augment": True}}


def with_grid(
    config: ModelConfig, size: tuple[int, int, int] | None, spacing: tuple[float, float, float] | None
) -> ModelConfig:
    """``config`` with its grid's size (slices, rows, columns) and/or spacing (mm) replaced."""
    size = tuple(size) if size else config.grid.size
    spacing = tuple(spacing) if spacing else config.grid.spacing
    if any(v < 2 for v in size) or not all(0 < v < float("inf") for v in spacing):
        raise InputError(
            f"grid: every size must be >= 2 and every spacing a number > 0 mm, got {list(size)} and {list(spacing)}"
        )
    return replace(config, grid=GridSpec(size, spacing))


def preset(name: str, dof: int = 3) -> ModelConfig:
    """The model configuration of a named preset for 3- or 6-DOF."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], dof=dof)
