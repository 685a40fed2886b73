"""Reading and writing registration cases: the project's case-folder format and the µRegPro layout.

Case folder (one per MR-TRUS pair)::

    case_id/
        mr.nii.gz | mr.nii | mr.nrrd | mr.nhdr | mr.mha | mr.mhd | mr/ (a DICOM series)   fixed image
        trus.*    (same choices)                                                          moving image
        gt.tfm    optional MR->TRUS LPS resampling transform (any ITK transform file: .tfm .txt .h5 .mat)
        landmarks.csv        optional: name,mr_x,mr_y,mr_z,trus_x,trus_y,trus_z (LPS mm)
        mr_prostate.*, trus_prostate.*   optional binary gland masks

µRegPro (``[nifti_data/]{train,val}/{mr_images,us_images,mr_labels,us_labels}/caseNNNNNN.nii.gz``) has no
transform files: the ground truth is the least-squares rigid fit of the centroids of the label channels that are
present in both label volumes (MR -> US). A µRegPro root is accepted wherever a case root is.

Every image is validated on reading; problems raise :class:`InputError` with one line naming the file.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry, image_files
from .errors import InputError
from .fileio import atomic_path, check_name, write_text

#: File suffixes read as images (lower case); a folder with the stem's name is read as a DICOM series.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Transform files accepted as ground truth, in order of preference.
GT_NAMES = ("gt.tfm", "gt.txt", "gt.h5", "gt.mat")
LANDMARK_COLUMNS = ("name", "mr_x", "mr_y", "mr_z", "trus_x", "trus_y", "trus_z")
#: A landmarks file larger than this is refused unread (ours hold tens of lines).
MAX_LANDMARKS_FILE_BYTES = 10_000_000
MUREGPRO_SPLITS = ("train", "val")
MUREGPRO_FOLDERS = ("mr_images", "us_images", "mr_labels", "us_labels")
#: SimpleITK metadata key of the DICOM PatientID (0010,0020), kept on images read from DICOM.
PATIENT_ID_KEY = "0010|0020"
#: Share of a gland mask's voxels that must lie inside its image's grid (a mask elsewhere is the wrong file
#: or has a wrong header).
MASK_INSIDE_MIN = 0.5


@dataclass(frozen=True, eq=False)
class Case:
    """One MR (fixed) / TRUS (moving) pair with its optional ground truth, landmarks and gland masks.

    ``gt`` is the 4x4 MR->TRUS LPS resampling matrix; landmarks are (N, 3) LPS mm arrays, row i of both
    arrays being the landmark ``landmark_names[i]``. Compared by identity (it holds images and arrays).
    """

    case_id: str
    mr: sitk.Image
    trus: sitk.Image
    gt: np.ndarray | None = None
    landmarks_mr: np.ndarray | None = None
    landmarks_trus: np.ndarray | None = None
    landmark_names: tuple[str, ...] = ()
    mr_mask: sitk.Image | None = None
    trus_mask: sitk.Image | None = None
    folder: Path | None = None


# --- images -------------------------------------------------------------------------------------------


def _read_dicom_series(folder: Path, what: str) -> sitk.Image:
    """The single DICOM series stored in ``folder``."""
    with image_files.native_output():  # GDCM warns about every file that is not DICOM
        try:
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError:
            series = None
    if series is None:
        raise InputError(f"{folder}: {what} folder cannot be scanned for DICOM files")
    if not series:
        raise InputError(f"{folder}: {what} folder holds no DICOM series")
    if len(series) > 1:
        raise InputError(f"{folder}: {what} folder holds {len(series)} DICOM series; keep exactly one")
    reader = sitk.ImageSeriesReader()
    with image_files.native_output():
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    reader.MetaDataDictionaryArrayUpdateOn()
    image = None
    with image_files.native_output() as native, contextlib.suppress(RuntimeError):
        image = reader.Execute()
    if image is None:
        raise InputError(f"{folder}: {what} DICOM series cannot be read{image_files.explain(native)}")
    image_files.check_geometry(image, folder, what)
    if reader.HasMetaDataKey(0, PATIENT_ID_KEY):
        image.SetMetaData(PATIENT_ID_KEY, reader.GetMetaData(0, PATIENT_ID_KEY))
    return image


def _read_raw(path: Path, what: str) -> sitk.Image:
    """Read a file or a DICOM-series folder without validation."""
    path = check_name(path, what)
    if path.is_dir():
        return _read_dicom_series(path, what)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    return image_files.read(path, what)


def _check_volume(image: sitk.Image, path: Path, what: str) -> np.ndarray:
    """Check that ``image`` is a finite, scalar 3D volume; return its voxel array (z, y, x)."""
    size = "x".join(str(s) for s in image.GetSize())
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(image.GetSize()) == 1):
        raise InputError(f"{path}: {what} is 2D (size {size}); expected a 3D volume")
    if image.GetDimension() != 3:
        raise InputError(f"{path}: {what} is {image.GetDimension()}D (size {size}); expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        n = image.GetNumberOfComponentsPerPixel()
        raise InputError(f"{path}: {what} has {n} components per voxel; expected a scalar (grey-level) image")
    array = sitk.GetArrayViewFromImage(image)
    if array.size == 0:
        raise InputError(f"{path}: {what} is empty (no voxels)")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{path}: {what} contains NaN or Inf voxels")
    image_files.check_range(array, path, what)
    return array


def read_image(path: Path, what: str = "image") -> sitk.Image:
    """Read and validate a 3D scalar image (file or DICOM-series folder); returns it as float32.

    Geometry (origin, spacing, direction; LPS mm) is kept as stored. Errors name the file: missing,
    unreadable, 2D or 4D, multi-component, empty, constant, NaN/Inf.
    """
    path = Path(path)
    image = _read_raw(path, what)
    array = _check_volume(image, path, what)
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise InputError(f"{path}: {what} is constant (every voxel is {low:g})")
    result = sitk.Cast(image, sitk.sitkFloat32)
    identifier = patient_id(image)
    if identifier is not None:  # Cast drops the metadata
        set_patient_id(result, identifier)
    return result


def patient_id(image: sitk.Image) -> str | None:
    """The DICOM PatientID an image was read with, or None (NIfTI, NRRD and MetaImage files carry none)."""
    if not image.HasMetaDataKey(PATIENT_ID_KEY):
        return None
    return image.GetMetaData(PATIENT_ID_KEY).strip() or None


def set_patient_id(image: sitk.Image, identifier: str) -> None:
    """Record a PatientID on an image (e.g. one built from a Slicer volume node that came from DICOM)."""
    image.SetMetaData(PATIENT_ID_KEY, identifier)


def patient_mismatch(mr: sitk.Image, trus: sitk.Image) -> str | None:
    """A warning when both images carry a PatientID and the two differ; None when they agree or one is unknown.

    A registration of another patient's TRUS can look plausible to D once G has aligned the two glands, so
    where the identity is known it is checked directly.
    """
    ids = patient_id(mr), patient_id(trus)
    if None in ids or ids[0] == ids[1]:
        return None
    return f"the MR and the TRUS belong to different patients ({ids[0]!r} and {ids[1]!r})"


def _binarize(image: sitk.Image, path: Path, what: str) -> sitk.Image:
    """Non-zero voxels -> 1 (uint8); rejects intensity images (non-integer values) and empty masks."""
    array = sitk.GetArrayViewFromImage(image)
    if np.any(array != np.round(array)):
        raise InputError(f"{path}: {what} is not a mask (it has non-integer values)")
    if not np.any(array):
        raise InputError(f"{path}: {what} is empty (no voxel is inside the mask)")
    mask = sitk.Cast(image != 0, sitk.sitkUInt8)
    mask.CopyInformation(image)
    return mask


def read_mask(path: Path, what: str = "mask") -> sitk.Image:
    """Read a 3D binary (or label) mask; returns uint8 with 1 inside (any non-zero label) and 0 outside."""
    path = Path(path)
    image = _read_raw(path, what)
    _check_volume(image, path, what)
    return _binarize(image, path, what)


def check_mask_inside(mask: sitk.Image, image: sitk.Image, path: Path, what: str) -> None:
    """Refuse a mask whose voxels mostly lie outside ``image``'s grid (it belongs elsewhere, or its header lies)."""
    inside_xyz = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(float)
    world = _voxels_to_lps(mask, inside_xyz)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    index = (world - np.asarray(image.GetOrigin())) @ direction / np.asarray(image.GetSpacing())  # (N, 3) xyz
    size = np.asarray(image.GetSize(), dtype=float)
    share = float(np.mean(np.all((index >= -0.5) & (index <= size - 0.5), axis=1)))
    if share < MASK_INSIDE_MIN:
        raise InputError(
            f"{path}: mask does not overlap the {what} ({share:.0%} of its voxels lie inside the image's grid)"
        )


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/stem.<suffix>`` for a supported suffix, or the DICOM folder ``folder/stem/``; None if absent.

    Raises InputError if more than one candidate exists (e.g. both ``mr.nii.gz`` and ``mr.nrrd``).
    """
    folder = Path(folder)
    found = [folder / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if (folder / stem).is_dir():
        found.append(folder / stem)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InputError(f"{folder}: several '{stem}' images ({names}); keep exactly one")
    return found[0] if found else None


# --- landmarks ----------------------------------------------------------------------------------------


def _parse_landmark_row(path: Path, line: int, row: dict) -> tuple[str, list[float]]:
    values = [row.get(c) for c in LANDMARK_COLUMNS]
    if any(v is None or not str(v).strip() for v in values):
        raise InputError(f"{path}: line {line} does not pair up (missing values)")
    try:
        coords = [float(v) for v in values[1:]]
    except ValueError:
        raise InputError(f"{path}: line {line} has a non-numeric coordinate") from None
    if not all(math.isfinite(v) for v in coords):
        raise InputError(f"{path}: line {line} has a NaN or Inf coordinate")
    return str(values[0]).strip(), coords


def read_landmarks(path: Path) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Read ``landmarks.csv``: names and the (N, 3) MR and TRUS points (LPS mm) of N paired landmarks."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: landmarks file not found")
    size = path.stat().st_size
    if size > MAX_LANDMARKS_FILE_BYTES:
        raise InputError(
            f"{path}: {size} bytes is too large for a landmarks file (limit {MAX_LANDMARKS_FILE_BYTES})"
        )
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, strict=True)
        try:
            rows = _landmark_rows(path, reader)
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text (save the landmarks file as UTF-8 CSV)") from None
        except csv.Error as exc:  # a NUL byte, a field over csv.field_size_limit() characters ...
            raise InputError(f"{path}: line {reader.line_num + 1}: not valid CSV ({exc})") from None
    if not rows:
        raise InputError(f"{path}: no landmarks (the file has a header only)")
    names = tuple(name for name, _ in rows)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{path}: duplicate landmark name(s) {', '.join(duplicates)}")
    points = np.array([coords for _, coords in rows], dtype=float)
    return names, points[:, :3], points[:, 3:]


def _landmark_rows(path: Path, reader: csv.DictReader) -> list[tuple[str, list[float]]]:
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in LANDMARK_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    reader.fieldnames = columns
    return [_parse_landmark_row(path, reader.line_num, row) for row in reader]


def write_landmarks(path: Path, names: Sequence[str], mr_points: np.ndarray, trus_points: np.ndarray) -> Path:
    """Write paired landmarks (LPS mm) as ``landmarks.csv``, atomically."""
    mr_points = np.asarray(mr_points, dtype=float).reshape(-1, 3)
    trus_points = np.asarray(trus_points, dtype=float).reshape(-1, 3)
    if not len(names) == len(mr_points) == len(trus_points):
        raise InputError(f"{path}: landmark names and points do not pair up")
    lines = [",".join(LANDMARK_COLUMNS)]
    for name, p, q in zip(names, mr_points, trus_points, strict=True):
        lines.append(",".join([name, *(f"{v:.10g}" for v in (*p, *q))]))
    return write_text(path, "\n".join(lines) + "\n")


# --- case folders -------------------------------------------------------------------------------------


def _find_gt(folder: Path) -> Path | None:
    found = [folder / n for n in GT_NAMES if (folder / n).is_file()]
    if len(found) > 1:
        raise InputError(
            f"{folder}: several ground-truth files ({', '.join(p.name for p in found)}); keep one"
        )
    return found[0] if found else None


def _read_folder_case(folder: Path, require_gt: bool) -> Case:
    if not folder.is_dir():
        raise InputError(f"{folder}: case folder not found")
    paths = {stem: find_image(folder, stem) for stem in ("mr", "trus", "mr_prostate", "trus_prostate")}
    for stem in ("mr", "trus"):
        if paths[stem] is None:
            raise InputError(
                f"{folder}: no {stem} image ({stem}.nii.gz, .nrrd, .mha, ... or a {stem}/ DICOM folder)"
            )
    gt_path = _find_gt(folder)
    if require_gt and gt_path is None:
        raise InputError(f"{folder}: no ground-truth transform (gt.tfm)")
    names, lm_mr, lm_trus = (), None, None
    if (folder / "landmarks.csv").is_file():
        names, lm_mr, lm_trus = read_landmarks(folder / "landmarks.csv")
    masks = {s: read_mask(p, f"{s} mask") if p else None for s, p in paths.items() if s.endswith("prostate")}
    mr, trus = read_image(paths["mr"], "MR image"), read_image(paths["trus"], "TRUS image")
    for stem, image in (("mr", mr), ("trus", trus)):
        if masks[f"{stem}_prostate"] is not None:
            check_mask_inside(
                masks[f"{stem}_prostate"], image, paths[f"{stem}_prostate"], f"{stem.upper()} image"
            )
    return Case(
        case_id=folder.name,
        mr=mr,
        trus=trus,
        gt=geometry.read_transform(gt_path) if gt_path else None,
        landmarks_mr=lm_mr,
        landmarks_trus=lm_trus,
        landmark_names=names,
        mr_mask=masks["mr_prostate"],
        trus_mask=masks["trus_prostate"],
        folder=folder,
    )


def read_case(folder: Path, require_gt: bool = False) -> Case:
    """Read a case folder, or a µRegPro case given as ``split_folder / name`` (as listed by :func:`list_cases`)."""
    folder = Path(folder)
    if not folder.exists() and _is_muregpro_split(folder.parent):
        case = read_muregpro_case(folder.parent, folder.name)
        if require_gt and case.gt is None:
            raise InputError(
                f"{folder.parent / 'mr_labels'}: no labels for {folder.name}, so no ground truth"
            )
        return case
    return _read_folder_case(folder, require_gt)


def _write_image(path: Path, image: sitk.Image, pixel_type: int) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk.Cast(image, pixel_type), str(tmp), True)


def _check_no_conflict(folder: Path, stem: str, name: str) -> None:
    existing = find_image(folder, stem)
    if existing is not None and existing.name != name:
        raise InputError(
            f"{existing}: already exists; writing {name} beside it would make the case ambiguous"
        )


def write_case(
    folder: Path,
    mr: sitk.Image,
    trus: sitk.Image,
    gt: np.ndarray | None = None,
    landmarks: tuple[Sequence[str], np.ndarray, np.ndarray] | None = None,
    mr_mask: sitk.Image | None = None,
    trus_mask: sitk.Image | None = None,
) -> Path:
    """Write a case folder (``mr.nii.gz``, ``trus.nii.gz``, ``gt.tfm``, ``landmarks.csv``, masks), each atomically.

    ``landmarks`` is ``(names, mr_points, trus_points)`` as returned by :func:`read_landmarks`.
    """
    folder = Path(folder)
    images = {"mr": (mr, sitk.sitkFloat32), "trus": (trus, sitk.sitkFloat32)}
    images.update({"mr_prostate": (mr_mask, sitk.sitkUInt8), "trus_prostate": (trus_mask, sitk.sitkUInt8)})
    images = {stem: v for stem, v in images.items() if v[0] is not None}
    if gt is not None:
        geometry.check_rigid(gt, str(folder / "gt.tfm"))
    for stem in images:
        _check_no_conflict(folder, stem, f"{stem}.nii.gz")
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (image, pixel_type) in images.items():
        _write_image(folder / f"{stem}.nii.gz", image, pixel_type)
    if gt is not None:
        geometry.write_transform(folder / "gt.tfm", gt)
    if landmarks is not None:
        write_landmarks(folder / "landmarks.csv", *landmarks)
    return folder


def _is_case_folder(folder: Path) -> bool:
    return folder.is_dir() and find_image(folder, "mr") is not None and find_image(folder, "trus") is not None


def list_cases(root: Path) -> list[Path]:
    """Sorted case folders under ``root`` (subfolders with mr.* and trus.*).

    For a µRegPro root the entries are ``split_folder / name`` (not real folders); :func:`read_case` reads them.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data folder not found")
    if is_muregpro(root):
        return [split / name for split, name in list_muregpro_cases(root)]
    return sorted(p for p in root.iterdir() if _is_case_folder(p))


def load_dataset(root: Path, require_gt: bool = True, progress: bool = True) -> list[Case]:
    """Read every case under ``root`` (case folders or a µRegPro tree); at least one case must exist."""
    folders = list_cases(root)
    if not folders:
        raise InputError(f"{root}: no cases (expected subfolders with mr.* and trus.*, or a µRegPro folder)")
    from tqdm import tqdm  # here, not at the top: the readers are on the inference path, tqdm is not

    return [read_case(f, require_gt) for f in tqdm(folders, desc="reading cases", disable=not progress)]


def split_cases(
    case_ids: Sequence[str], val_fraction: float = 1 / 6, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Seeded split of case ids into (train, validation), by case; both lists sorted.

    Deterministic for a given set of ids (input order does not matter); with two or more cases each part gets
    at least one case.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise InputError("case ids are not unique; cannot split by case")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"validation fraction must be in [0, 1), got {val_fraction}")
    if len(ids) < 2:
        return ids, []
    n_val = min(max(round(len(ids) * val_fraction), 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    return sorted(set(ids) - set(val)), val


# --- geometry helpers ---------------------------------------------------------------------------------


def fit_rigid(src_points: np.ndarray, dst_points: np.ndarray) -> np.ndarray:
    """Least-squares rigid 4x4 matrix mapping ``src_points`` onto ``dst_points`` (Kabsch, no scale, det +1).

    Needs at least 3 non-collinear point pairs (otherwise the rotation about their line is undetermined).
    """
    src = np.asarray(src_points, dtype=float).reshape(-1, 3)
    dst = np.asarray(dst_points, dtype=float).reshape(-1, 3)
    if src.shape != dst.shape:
        raise InputError(f"rigid fit: {len(src)} source points but {len(dst)} target points")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise InputError("rigid fit: points contain NaN or Inf")
    too_few = InputError(f"rigid fit: needs at least 3 non-collinear point pairs, got {len(src)}")
    if len(src) < 3:
        raise too_few
    src_c, dst_c = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - src_c, dst - dst_c
    singular = np.linalg.svd(a, compute_uv=False)
    if singular[1] <= 1e-6 * max(singular[0], 1e-12):
        raise too_few
    u, _, vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(u @ vt))
    rotation = u @ np.diag([1.0, 1.0, d]) @ vt
    return geometry.homogeneous(rotation, dst_c - rotation @ src_c)


def _voxels_to_lps(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    """Physical LPS mm of continuous voxel indices (N, 3) in (x, y, z) order."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    scaled = index_xyz * np.asarray(image.GetSpacing(), dtype=float)
    return scaled @ direction.T + np.asarray(image.GetOrigin(), dtype=float)


def points_in_mask(mask: sitk.Image, n: int, seed: int) -> np.ndarray:
    """(n, 3) LPS mm voxel centres spread through a mask (farthest-point sampling from a seeded start).

    Used to measure a transform-derived TRE when a case has no landmarks.
    """
    inside = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(float)
    if len(inside) < n:
        raise InputError(f"mask: has only {len(inside)} voxels inside, cannot spread {n} points")
    rng = np.random.default_rng(seed)
    candidates = _voxels_to_lps(mask, inside[rng.permutation(len(inside))[:20000]])
    chosen = [0]
    distance = np.linalg.norm(candidates - candidates[0], axis=1)
    for _ in range(n - 1):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(candidates - candidates[chosen[-1]], axis=1))
    return candidates[chosen[:n]]


# --- µRegPro ------------------------------------------------------------------------------------------


def _is_muregpro_split(folder: Path) -> bool:
    return all((folder / sub).is_dir() for sub in ("mr_images", "us_images"))


def _muregpro_splits(root: Path) -> list[Path]:
    """Split folders of a µRegPro root, a ``nifti_data`` parent, or a split folder itself."""
    root = Path(root)
    if _is_muregpro_split(root):
        return [root]
    for base in (root, root / "nifti_data"):
        splits = [base / s for s in MUREGPRO_SPLITS if _is_muregpro_split(base / s)]
        if splits:
            return splits
    return []


def is_muregpro(root: Path) -> bool:
    """True if ``root`` is a µRegPro tree (root, ``nifti_data`` parent or one split folder)."""
    return bool(_muregpro_splits(root))


def _case_name(filename: str) -> str:
    return filename[: -len(".nii.gz")] if filename.endswith(".nii.gz") else Path(filename).stem


def case_files(case: Path) -> list[Path]:
    """The files a case is read from (as listed by :func:`list_cases`): every file in its folder, or the
    µRegPro images and labels of that name."""
    case = Path(case)
    if not case.exists() and _is_muregpro_split(case.parent):
        candidates = [case.parent / sub / f"{case.name}.nii.gz" for sub in MUREGPRO_FOLDERS]
        return [p for p in candidates if p.is_file()]
    return sorted(p for p in case.rglob("*") if p.is_file())


def list_muregpro_cases(root: Path) -> list[tuple[Path, str]]:
    """(split_folder, case name) of every case whose MR or US image exists, sorted."""
    cases = []
    for split in _muregpro_splits(root):
        names = {
            _case_name(p.name) for sub in ("mr_images", "us_images") for p in (split / sub).glob("*.nii.gz")
        }
        cases.extend((split, name) for name in sorted(names))
    return cases


def _label_channels(path: Path, what: str) -> list[sitk.Image]:
    """The 3D channels of a µRegPro label file (4D scalar image or 3D vector image; a 3D scalar is 1 channel)."""
    image = _read_raw(path, what)
    if image.GetNumberOfComponentsPerPixel() > 1:
        channels = [
            sitk.VectorIndexSelectionCast(image, k) for k in range(image.GetNumberOfComponentsPerPixel())
        ]
    elif image.GetDimension() == 4:
        size = list(image.GetSize())
        channels = [sitk.Extract(image, size[:3] + [0], [0, 0, 0, k]) for k in range(size[3])]
    else:
        channels = [image]
    for channel in channels:
        _check_volume(channel, path, what)
    return channels


def _centroid(channel: sitk.Image) -> np.ndarray | None:
    inside = np.argwhere(sitk.GetArrayViewFromImage(channel) > 0)
    return _voxels_to_lps(channel, inside[:, ::-1].mean(axis=0)[None])[0] if len(inside) else None


def _gland_mask(channel: sitk.Image) -> sitk.Image | None:
    mask = sitk.Cast(channel > 0, sitk.sitkUInt8)
    mask.CopyInformation(channel)
    return mask if np.any(sitk.GetArrayViewFromImage(mask)) else None


def read_muregpro_case(root_split: Path, name: str) -> Case:
    """Read one µRegPro case: fixed MR, moving US, gland masks (channel 0) and the centroid-fitted ground truth.

    Landmarks are the centroids (LPS mm) of the label channels non-empty in both label files, named
    ``labelNN`` by channel; the ground truth is their least-squares rigid fit MR -> US. Without label
    folders the case has no ground truth, masks or landmarks.
    """
    split, name = Path(root_split), _case_name(name)
    files = {sub: split / sub / f"{name}.nii.gz" for sub in MUREGPRO_FOLDERS}
    for sub in ("mr_images", "us_images"):
        if not files[sub].is_file():
            raise InputError(f"{files[sub]}: image file missing")
    mr, trus = read_image(files["mr_images"], "MR image"), read_image(files["us_images"], "US image")
    if not any((split / sub).is_dir() for sub in ("mr_labels", "us_labels")):
        return Case(case_id=name, mr=mr, trus=trus, folder=split)
    for sub in ("mr_labels", "us_labels"):
        if not files[sub].is_file():
            raise InputError(f"{files[sub]}: label file missing (missing channels)")
    mr_labels = _label_channels(files["mr_labels"], "MR label")
    us_labels = _label_channels(files["us_labels"], "US label")
    if len(mr_labels) != len(us_labels):
        raise InputError(
            f"{files['us_labels']}: {len(us_labels)} label channels but {files['mr_labels'].name} in mr_labels "
            f"has {len(mr_labels)} (missing channels)"
        )
    names, mr_points, us_points = [], [], []
    for k, (mr_channel, us_channel) in enumerate(zip(mr_labels, us_labels, strict=True)):
        p, q = _centroid(mr_channel), _centroid(us_channel)
        if p is not None and q is not None:
            names.append(f"label{k:02d}")
            mr_points.append(p)
            us_points.append(q)
    try:
        gt = fit_rigid(np.array(mr_points), np.array(us_points))
    except InputError as exc:
        raise InputError(f"{files['mr_labels']}: cannot fit the ground truth: {exc}") from None
    return Case(
        case_id=name,
        mr=mr,
        trus=trus,
        gt=gt,
        landmarks_mr=np.array(mr_points),
        landmarks_trus=np.array(us_points),
        landmark_names=tuple(names),
        mr_mask=_gland_mask(mr_labels[0]),
        trus_mask=_gland_mask(us_labels[0]),
        folder=split,
    )
