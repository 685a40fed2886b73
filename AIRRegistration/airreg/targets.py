"""Biopsy targets: MR target points and label maps mapped into TRUS space with a registration result.

Needs only numpy and SimpleITK (Slicer imports it). Points are LPS millimetres inside the module; files say
their frame. ``mr_to_trus`` is the registration's 4x4 LPS resampling matrix: it maps an MR point to the same
anatomical point in TRUS space (see ``airreg.geometry``), so points are mapped by it and a label map is resampled
through its inverse (each TRUS voxel looks up the MR voxel it came from).

Target CSV (read and written)::

    # AIRRegistration targets; space=MR; frame=LPS; units=mm
    label,x,y,z
    lesion_1,12.5,-30.2,41.0

Lines starting with ``#`` are comments; ``key=value`` words in them declare the file: ``frame=LPS`` or
``frame=RAS`` (the frame of columns ``x,y,z``) and optionally ``space=MR`` or ``space=TRUS``. Columns named
``x_lps,y_lps,z_lps`` or ``x_ras,y_ras,z_ras`` carry their frame in their names instead; the files this module
writes hold both (they must agree when read back). Slicer markups point lists (``.mrk.json``) are read and
written too, in the ``coordinateSystem`` they declare (LPS when absent, as in Slicer's schema).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry
from .errors import InputError
from .fileio import atomic_path, check_writable, write_text

FRAMES = ("LPS", "RAS")
SPACES = ("MR", "TRUS")
CSV_SUFFIX = ".csv"
MARKUPS_SUFFIX = ".mrk.json"
#: Label-map files written here (single files only: a .nhdr header would point at a temporary data file).
LABEL_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
#: Schema that Slicer 5.x writes and reads for markups (Modules/Loadable/Markups/Resources/Schema in Slicer).
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
_FRAME_COLUMNS = {frame: tuple(f"{axis}_{frame.lower()}" for axis in "xyz") for frame in FRAMES}
_UNITS_MM = {"mm": 1.0, "um": 1e-3}
#: How far (mm) the LPS and RAS columns of one row may disagree when both are given.
_FRAME_AGREEMENT_MM = 1e-3
_INTEGER_PIXELS = {
    sitk.sitkUInt8,
    sitk.sitkInt8,
    sitk.sitkUInt16,
    sitk.sitkInt16,
    sitk.sitkUInt32,
    sitk.sitkInt32,
    sitk.sitkUInt64,
    sitk.sitkInt64,
}


@dataclass(frozen=True, eq=False)
class Targets:
    """Named points: ``labels[i]`` is the label of row i of ``points_lps`` (N, 3), LPS millimetres."""

    labels: tuple[str, ...]
    points_lps: np.ndarray

    def __post_init__(self) -> None:
        points = np.array(self.points_lps, dtype=float).reshape(-1, 3)
        if len(points) != len(self.labels):
            raise InputError(f"targets: {len(self.labels)} labels for {len(points)} points")
        if not np.all(np.isfinite(points)):
            raise InputError("targets: a coordinate is NaN or Inf")
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        object.__setattr__(self, "points_lps", points)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def points_ras(self) -> np.ndarray:
        """The points in RAS millimetres (Slicer's world), shape (N, 3)."""
        return lps_to_ras(self.points_lps)

    def mapped(self, mr_to_trus: np.ndarray) -> Targets:
        """The same targets in TRUS space: each point mapped by the MR->TRUS LPS resampling matrix."""
        matrix = geometry.check_rigid(mr_to_trus, "MR->TRUS transform")
        return Targets(self.labels, geometry.apply(matrix, self.points_lps))


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Points (N, 3) or (3,) from LPS to RAS; the same flip converts back (:func:`ras_to_lps`)."""
    return geometry.apply(geometry.RAS_TO_LPS, points)


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """Points (N, 3) or (3,) from RAS to LPS."""
    return geometry.apply(geometry.RAS_TO_LPS, points)


# --- reading -----------------------------------------------------------------------------------------


def read_targets(path: str | os.PathLike, space: str = "MR") -> Targets:
    """Read target points from a CSV file or a Slicer ``.mrk.json`` point list (see the module docstring).

    A CSV file that declares ``space=`` other than ``space`` is refused (TRUS targets given as MR targets
    would be mapped twice). Errors are one-line InputErrors naming the file and the line or element.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: targets file not found")
    name = path.name.lower()
    if name.endswith(MARKUPS_SUFFIX) or name.endswith(".json"):
        return _read_markups(path)
    if name.endswith(CSV_SUFFIX):
        return _read_csv(path, space)
    raise InputError(f"{path}: unknown targets file type (use .csv or .mrk.json)")


def _declarations(path: Path, line: int, comment: str) -> dict[str, str]:
    """``key=value`` words of a comment line, for the keys ``frame`` and ``space`` (values upper case)."""
    found = {}
    for word in comment.lstrip("#").replace(";", " ").replace(",", " ").split():
        key, sep, value = word.partition("=")
        key, value = key.strip().lower(), value.strip().upper()
        if not sep or key not in ("frame", "space"):
            continue
        allowed = FRAMES if key == "frame" else SPACES
        if value not in allowed:
            raise InputError(f"{path}: line {line}: {key}={value} is not one of {', '.join(allowed)}")
        found[key] = value
    return found


def _csv_columns(path: Path, line: int, header: list[str], frame: str | None) -> dict[str, tuple[int, ...]]:
    """Column indices of the label and of the coordinates in each frame the header provides."""
    columns = [c.strip().lower() for c in header]
    label = next((c for c in ("label", "name") if c in columns), None)
    if label is None:
        raise InputError(f"{path}: line {line}: the header has no 'label' (or 'name') column")
    found = {"label": (columns.index(label),)}
    for name, names in _FRAME_COLUMNS.items():
        if all(c in columns for c in names):
            found[name] = tuple(columns.index(c) for c in names)
    if all(c in columns for c in "xyz"):
        if frame is None:
            raise InputError(
                f"{path}: line {line}: columns x,y,z need a frame: add a comment line '# frame=LPS' or "
                "'# frame=RAS' above the header (or name the columns x_lps,y_lps,z_lps or x_ras,y_ras,z_ras)"
            )
        found.setdefault(frame, tuple(columns.index(c) for c in "xyz"))
    if len(found) == 1:
        raise InputError(
            f"{path}: line {line}: no coordinate columns (expected x,y,z with a declared frame, "
            "x_lps,y_lps,z_lps or x_ras,y_ras,z_ras)"
        )
    return found


def _csv_point(path: Path, line: int, row: list[str], columns: dict[str, tuple[int, ...]]) -> np.ndarray:
    """The LPS point of one data row; when both frames are given, they must agree."""
    points = {}
    for frame in FRAMES:
        if frame not in columns:
            continue
        try:
            values = [float(row[i]) for i in columns[frame]]
        except IndexError:
            raise InputError(f"{path}: line {line}: missing values ({len(row)} columns)") from None
        except ValueError:
            raise InputError(f"{path}: line {line}: a coordinate is not a number") from None
        if not all(math.isfinite(v) for v in values):
            raise InputError(f"{path}: line {line}: a coordinate is NaN or Inf")
        points[frame] = np.array(values) if frame == "LPS" else ras_to_lps(np.array(values))
    if len(points) == 2 and np.linalg.norm(points["LPS"] - points["RAS"]) > _FRAME_AGREEMENT_MM:
        raise InputError(f"{path}: line {line}: the LPS and RAS columns give different points")
    return points.get("LPS", points.get("RAS"))


def _read_csv(path: Path, space: str) -> Targets:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text (UTF-8) CSV file") from None
    declared: dict[str, str] = {}
    columns = None
    labels, points = [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        if text.lstrip().startswith("#"):
            declared.update(_declarations(path, number, text))
            continue
        row = next(csv.reader([text]))
        if columns is None:
            if declared.get("space", space) != space:
                raise InputError(
                    f"{path}: the file declares space={declared['space']}; expected targets in {space} space"
                )
            columns = _csv_columns(path, number, row, declared.get("frame"))
            continue
        if columns["label"][0] >= len(row):
            raise InputError(f"{path}: line {number}: missing values ({len(row)} columns)")
        labels.append(row[columns["label"][0]].strip())
        points.append(_csv_point(path, number, row, columns))
    if columns is None:
        raise InputError(f"{path}: empty targets file (no header line)")
    if not labels:
        raise InputError(f"{path}: no targets (the file has a header only)")
    return Targets(tuple(labels), np.array(points))


def _markups_units(path: Path, where: str, units) -> float:
    """Millimetres per unit of a markup's ``coordinateUnits`` (a name, or a [code, scheme, meaning] triple)."""
    code = units[0] if isinstance(units, list) and units else units
    if code not in _UNITS_MM:
        raise InputError(f"{path}: {where}: coordinateUnits {units!r} is not mm or um")
    return _UNITS_MM[code]


def _markup_points(path: Path, index: int, markup) -> tuple[list[str], list[np.ndarray]]:
    """Labels and LPS points of one point-list markup of a .mrk.json file."""
    where = f"markups[{index}]"
    if not isinstance(markup, dict):
        raise InputError(f"{path}: {where} is not an object")
    if markup.get("type") != "Fiducial":
        raise InputError(
            f"{path}: {where} is a {markup.get('type')!r} markup; expected a point list (Fiducial)"
        )
    frame = markup.get("coordinateSystem", "LPS")
    if frame not in FRAMES:
        raise InputError(f"{path}: {where}: coordinateSystem {frame!r} is not LPS or RAS")
    scale = _markups_units(path, where, markup.get("coordinateUnits", "mm"))
    labels, points = [], []
    control_points = markup.get("controlPoints", [])
    if not isinstance(control_points, list):
        raise InputError(f"{path}: {where}.controlPoints is not a list")
    for j, point in enumerate(control_points):
        at = f"{where}.controlPoints[{j}]"
        if not isinstance(point, dict):
            raise InputError(f"{path}: {at} is not an object")
        label = str(point.get("label", ""))
        if point.get("positionStatus", "defined") not in ("defined", "preview"):
            raise InputError(f"{path}: {at} ('{label}') has no position (positionStatus undefined)")
        position = point.get("position")
        valid = isinstance(position, list) and len(position) == 3
        if not valid or not all(isinstance(v, int | float) and math.isfinite(v) for v in position):
            raise InputError(f"{path}: {at} ('{label}'): position must be 3 finite numbers")
        xyz = np.array(position, dtype=float) * scale
        labels.append(label)
        points.append(xyz if frame == "LPS" else ras_to_lps(xyz))
    return labels, points


def _read_markups(path: Path) -> Targets:
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text (UTF-8) JSON file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list) or not markups:
        raise InputError(f"{path}: not a Slicer markups file (no 'markups' list)")
    labels, points = [], []
    for index, markup in enumerate(markups):
        more_labels, more_points = _markup_points(path, index, markup)
        labels += more_labels
        points += more_points
    if not labels:
        raise InputError(f"{path}: the point list has no control points")
    return Targets(tuple(labels), np.array(points))


# --- writing -----------------------------------------------------------------------------------------


def check_targets_output(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when ``path`` is not a .csv or .mrk.json file that can be written."""
    path = Path(path)
    if not path.name.lower().endswith((CSV_SUFFIX, MARKUPS_SUFFIX)):
        raise InputError(f"{path}: unknown targets file type (use .csv or .mrk.json)")
    return check_writable(path)


def write_targets(path: str | os.PathLike, targets: Targets, space: str = "TRUS", name: str = "") -> Path:
    """Write targets atomically as CSV (LPS and RAS columns, header comment) or Slicer ``.mrk.json`` (LPS).

    ``space`` names the space the points are in (written into the CSV header); ``name`` becomes the markups
    node name in Slicer (default: the file name).
    """
    path = check_targets_output(path)
    if space not in SPACES:
        raise InputError(f"{path}: space must be one of {', '.join(SPACES)}, got {space!r}")
    if path.name.lower().endswith(MARKUPS_SUFFIX):
        return write_text(path, markups_json(targets, name or path.name[: -len(MARKUPS_SUFFIX)]))
    return write_text(path, targets_csv(targets, space))


def targets_csv(targets: Targets, space: str) -> str:
    """CSV text: a header comment stating space, units and frames, then label and LPS and RAS coordinates."""
    out = io.StringIO()
    out.write(
        f"# AIRRegistration targets; space={space}; units=mm; "
        "x_lps,y_lps,z_lps: LPS (ITK, DICOM); x_ras,y_ras,z_ras: RAS (3D Slicer)\n"
    )
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["label", *_FRAME_COLUMNS["LPS"], *_FRAME_COLUMNS["RAS"]])
    for label, lps, ras in zip(targets.labels, targets.points_lps, targets.points_ras, strict=True):
        writer.writerow([label, *(f"{v:.12g}" for v in (*lps, *ras))])
    return out.getvalue()


def markups_json(targets: Targets, name: str) -> str:
    """A Slicer markups point list (schema v1.0.3) holding the targets in LPS millimetres."""
    control_points = [
        {
            "id": str(i + 1),
            "label": label,
            "description": "",
            "associatedNodeID": "",
            "position": [float(v) for v in point],
            "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],  # identity in RAS, seen in LPS
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for i, (label, point) in enumerate(zip(targets.labels, targets.points_lps, strict=True))
    ]
    markup = {
        "type": "Fiducial",
        "name": name,
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(control_points),
        "controlPoints": control_points,
        "measurements": [],
    }
    return json.dumps({"@schema": MARKUPS_SCHEMA, "markups": [markup]}, indent=4, allow_nan=False) + "\n"


def outside(targets: Targets, image: sitk.Image) -> list[str]:
    """Labels of the targets that lie outside the image's voxel grid (a target the TRUS did not cover)."""
    size = np.array(image.GetSize(), dtype=float)
    labels = []
    for label, point in zip(targets.labels, targets.points_lps, strict=True):
        index = np.array(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))
        if np.any(index < -0.5) or np.any(index > size - 0.5):
            labels.append(label)
    return labels


# --- label maps --------------------------------------------------------------------------------------


def read_label_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D label map (integer labels; a float image whose voxels are all whole numbers is accepted).

    Slicer's ``.seg.nrrd`` files with one layer are label maps; overlapping segments (several layers, a 4D
    or multi-component file) are refused. Float label maps are converted to 32-bit integers.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: segmentation file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"{path}: segmentation is not a readable image file") from None
    size = "x".join(str(s) for s in image.GetSize())
    if image.GetDimension() != 3 or min(image.GetSize()) < 1:
        raise InputError(
            f"{path}: segmentation is {image.GetDimension()}D (size {size}); expected a 3D label map"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: segmentation has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(overlapping segments?); export it as a label map with one label per voxel"
        )
    if image.GetPixelID() not in _INTEGER_PIXELS:
        array = sitk.GetArrayViewFromImage(image)
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{path}: segmentation has non-integer voxel values; expected a label map")
        image = sitk.Cast(image, sitk.sitkInt32)
    if not np.any(sitk.GetArrayViewFromImage(image)):
        raise InputError(f"{path}: segmentation holds no labels (every voxel is 0)")
    return image


def map_label_image(labels: sitk.Image, mr_to_trus: np.ndarray, trus_grid: sitk.Image) -> sitk.Image:
    """The MR label map on the TRUS grid (nearest neighbour, so label values are kept; 0 outside the MR).

    ``trus_grid`` gives the output's size, origin, spacing and direction (LPS); its voxels are not read.
    """
    matrix = geometry.check_rigid(mr_to_trus, "MR->TRUS transform")
    trus_to_mr = geometry.to_sitk(geometry.invert(matrix))
    return sitk.Resample(labels, trus_grid, trus_to_mr, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def label_values(image: sitk.Image) -> list[int]:
    """The non-zero label values present in a label map, ascending."""
    values = np.unique(sitk.GetArrayViewFromImage(image))
    return [int(v) for v in values if v != 0]


def label_names(image: sitk.Image) -> dict[int, str]:
    """Label value -> segment name, from the header of a Slicer ``.seg.nrrd`` (empty for other label maps)."""
    names = {}
    index = 0
    while image.HasMetaDataKey(f"Segment{index}_Name"):
        value_key = f"Segment{index}_LabelValue"
        value = image.GetMetaData(value_key).strip() if image.HasMetaDataKey(value_key) else ""
        names[int(value) if value.isdigit() else index + 1] = image.GetMetaData(f"Segment{index}_Name")
        index += 1
    return names


def check_label_output(path: str | os.PathLike) -> Path:
    """Fail early when ``path`` is not a writable label-map file name (.nrrd, .nii, .nii.gz, .mha)."""
    path = Path(path)
    if not path.name.lower().endswith(LABEL_SUFFIXES):
        raise InputError(f"{path}: unknown label-map file type (use {', '.join(LABEL_SUFFIXES)})")
    return check_writable(path)


def write_label_image(path: str | os.PathLike, image: sitk.Image) -> Path:
    """Write a label map atomically (compressed), keeping its voxel type and geometry."""
    path = check_label_output(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


# --- a registration's target files --------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TargetFiles:
    """What ``airreg register`` maps into TRUS space: targets and a label map read from the MR side, and the
    files to write them to. Read before registering, so that bad input stops before any work."""

    targets: Targets | None = None
    targets_file: Path | None = None
    out_targets: Path | None = None
    labels: sitk.Image | None = None
    segmentation_file: Path | None = None
    out_segmentation: Path | None = None

    @classmethod
    def read(
        cls,
        targets_file: Path | None,
        out_targets: Path | None,
        segmentation_file: Path | None,
        out_segmentation: Path | None,
    ) -> TargetFiles:
        """Check that inputs and outputs come in pairs and that the outputs can be written; read the inputs.

        That no output replaces an input is checked for every command by ``cli.check_arguments``."""
        for given, output, what in (
            (targets_file, out_targets, "--targets and --out-targets"),
            (segmentation_file, out_segmentation, "--segmentation and --out-segmentation"),
        ):
            if (given is None) != (output is None):
                raise InputError(f"{what} go together: give both or neither")
        if out_targets is not None:
            check_targets_output(out_targets)
        if out_segmentation is not None:
            check_label_output(out_segmentation)
        return cls(
            targets=read_targets(targets_file) if targets_file else None,
            targets_file=targets_file,
            out_targets=out_targets,
            labels=read_label_image(segmentation_file) if segmentation_file else None,
            segmentation_file=segmentation_file,
            out_segmentation=out_segmentation,
        )

    def write(self, mr_to_trus: np.ndarray, trus_grid: sitk.Image) -> dict:
        """Map and write the outputs; return the report's entries (file names, counts, what fell outside)."""
        report: dict = {}
        if self.targets is not None:
            mapped = self.targets.mapped(mr_to_trus)
            write_targets(self.out_targets, mapped, space="TRUS")
            report["targets"] = targets_report(self.targets_file, self.out_targets, mapped, trus_grid)
        if self.labels is not None:
            on_trus = map_label_image(self.labels, mr_to_trus, trus_grid)
            write_label_image(self.out_segmentation, on_trus)
            report["segmentation"] = segmentation_report(
                self.segmentation_file, self.out_segmentation, self.labels, on_trus
            )
        return report


def targets_report(source, output, mapped: Targets, trus_grid: sitk.Image) -> dict:
    """Report entry of mapped targets: the files, how many, and which fell outside the TRUS volume."""
    return {
        "file": str(source) if source is not None else None,
        "output_file": str(output),
        "count": len(mapped),
        "outside_trus_volume": outside(mapped, trus_grid),
    }


def segmentation_report(source, output, labels: sitk.Image, on_trus: sitk.Image) -> dict:
    """Report entry of a mapped label map: the files, the labels (with their segment names when the file
    has them), and the labels the TRUS grid lost."""
    kept = set(label_values(on_trus))
    values = label_values(labels)
    entry = {
        "file": str(source) if source is not None else None,
        "output_file": str(output),
        "labels": values,
        "labels_outside_trus_volume": [v for v in values if v not in kept],
    }
    names = label_names(labels)
    if names:
        entry["label_names"] = {str(v): names[v] for v in values if v in names}
    return entry


def coverage_warnings(report: dict) -> list[str]:
    """One line per target or label that the TRUS volume does not cover (from :meth:`TargetFiles.write`)."""
    lines = []
    outside_targets: Sequence[str] = report.get("targets", {}).get("outside_trus_volume", [])
    if outside_targets:
        lines.append(f"targets outside the TRUS volume: {', '.join(outside_targets)}")
    lost = report.get("segmentation", {}).get("labels_outside_trus_volume", [])
    if lost:
        lines.append(f"labels outside the TRUS volume: {', '.join(str(v) for v in lost)}")
    return lines
