"""Hypothesis fuzz of the readers that take files from users: ITK transform files, landmarks.csv, model files.

Each reader must return a valid result or raise its one-line error (InputError / ModelError); anything else (another
exception, a native crash) is a failure. Run as a script so that a crash kills this process, not the test run::

    python Testing/fuzz_readers.py --reader transform --examples 2000 --seed 1

It prints ``<reader>: <n> examples, <accepted> accepted, <refused> refused`` and exits 0, or 1 with the failing
example (a native crash ends it with the signal's status). ``test_bad_inputs_readers.py`` runs a short fuzz of each
reader this way.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from airreg import checkpoint, data, geometry  # noqa: E402
from airreg.errors import InputError, ModelError  # noqa: E402

TALLY: Counter = Counter()

# --- transform files ------------------------------------------------------------------------------------

TYPES = [
    "IdentityTransform", "TranslationTransform", "Euler3DTransform", "VersorRigid3DTransform", "VersorTransform",
    "Similarity3DTransform", "ScaleSkewVersor3DTransform", "ScaleVersor3DTransform", "ScaleTransform",
    "AffineTransform", "MatrixOffsetTransformBase", "CompositeTransform", "BSplineTransform",
    "QuaternionRigidTransform", "Euler2DTransform",
]  # fmt: skip
NUMBER_TOKENS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(-1.0, 1.0).map(lambda v: f"{v:.17g}"),
    st.sampled_from(["", "nan", "-inf", "1e999", "1_0", "0x1p3", "--1", ".", "e3", "１"]),
    st.text(max_size=6),
)
TYPE_NAMES = st.one_of(
    st.builds(lambda t, p, d: f"{t}_{p}_{d}", st.sampled_from(TYPES), st.sampled_from(["double", "float"]),
              st.sampled_from(["3_3", "2_2", "3_2", "4_4"])),
    st.text(max_size=20),
)  # fmt: skip
LINES = st.one_of(
    st.builds(lambda n: f"#Transform {n}", st.integers(-2, 5)),
    TYPE_NAMES.map(lambda t: f"Transform: {t}"),
    st.lists(NUMBER_TOKENS, max_size=17).map(lambda v: "Parameters: " + " ".join(v)),
    st.lists(NUMBER_TOKENS, max_size=5).map(lambda v: "FixedParameters: " + " ".join(v)),
    st.text(max_size=30),
)
TRANSFORM_TEXT = st.builds(
    lambda header, lines: "\n".join([header, *lines]) + "\n",
    st.sampled_from(["#Insight Transform File V1.0", "#Insight Transform File V1.0 ", "", "#Insight"]),
    st.lists(LINES, max_size=12),
)


def _valid_files(folder: Path) -> dict[str, bytes]:
    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, 0.2, 0.3, (4.0, 5.0, 6.0))
    files = {}
    for suffix in (".tfm", ".mat", ".xfm"):
        sitk.WriteTransform(euler, str(folder / f"v{suffix}"))
        files[suffix] = (folder / f"v{suffix}").read_bytes()
    return files


def _mutate(raw: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buffer = bytearray(raw)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    return bytes(buffer[:cut] if cut is not None else buffer)


def _check_transform(path: Path) -> None:
    try:
        matrix = geometry.read_transform(path)
    except InputError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
        TALLY["refused"] += 1
        return
    geometry.check_rigid(matrix)  # an accepted file yields a finite rigid matrix
    TALLY["accepted"] += 1


def fuzz_transform(examples: int, seed: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-transform-"))
    valid = _valid_files(folder)
    edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)
    mutated = st.builds(
        lambda suffix, e, cut: (suffix, _mutate(valid[suffix], e, cut)),
        st.sampled_from(sorted(valid)),
        edits,
        st.none() | st.integers(0, 400),
    )
    text = st.builds(
        lambda t, s: (s, t.encode("utf-8", "surrogatepass")),
        TRANSFORM_TEXT,
        st.sampled_from([".tfm", ".txt"]),
    )

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(text, mutated))
    def run(example):
        suffix, raw = example
        path = folder / f"t{suffix}"
        path.write_bytes(raw)
        _check_transform(path)

    run()


# --- landmarks.csv ----------------------------------------------------------------------------------------

HEADER = "name,mr_x,mr_y,mr_z,trus_x,trus_y,trus_z"
CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", '"', '"a,b"', "apex", "1e999", "\0", "x" * 200_000]),
    st.text(max_size=8),
)
VALID_ROW = st.builds(
    lambda name, values: ",".join([name, *map(repr, values)]),
    st.text(st.characters(blacklist_characters=',"\r\n'), min_size=1, max_size=6),
    st.lists(st.floats(-1e6, 1e6), min_size=6, max_size=6),
)
ROWS = st.lists(st.one_of(VALID_ROW, st.lists(CELLS, min_size=0, max_size=9).map(",".join)), max_size=6)
LANDMARK_BYTES = st.one_of(
    st.builds(
        lambda header, rows, encoding, newline: newline.join([header, *rows]).encode(encoding, "replace"),
        st.sampled_from([HEADER, HEADER.upper(), "name,mr_x", "\ufeff" + HEADER, ""]),
        ROWS,
        st.sampled_from(["utf-8", "latin-1", "utf-16"]),
        st.sampled_from(["\n", "\r\n", "\r"]),
    ),
    st.binary(max_size=300),
)


def fuzz_landmarks(examples: int, seed: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-landmarks-"))

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(LANDMARK_BYTES)
    def run(raw):
        path = folder / "landmarks.csv"
        path.write_bytes(raw)
        try:
            names, mr, trus = data.read_landmarks(path)
        except InputError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
            TALLY["refused"] += 1
            return
        assert len(names) == len(mr) == len(trus) > 0
        assert np.isfinite(mr).all() and np.isfinite(trus).all()
        TALLY["accepted"] += 1

    run()


# --- model files ------------------------------------------------------------------------------------------

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.floats(allow_nan=True), max_size=6),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
    st.builds(lambda shape: __import__("torch").zeros(shape), st.lists(st.integers(0, 4), max_size=3)),
)


def _paths(state: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path into the nested dicts of a checkpoint (state dicts' tensors included)."""
    out = []
    for key, value in state.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_paths(value, (*prefix, key)))
    return out


def fuzz_model(examples: int, seed: int) -> None:
    import torch

    from airreg.registration import Registrar
    from test_checkpoint import minimal_state

    folder = Path(tempfile.mkdtemp(prefix="fuzz-model-"))
    base = checkpoint.export_for_inference({"format": checkpoint.FORMAT, **minimal_state()})
    base_bytes = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, "format_version": 1, **base}, base_bytes)
    paths = _paths(base)
    edit = st.tuples(st.sampled_from(paths), VALUES, st.booleans())
    crafted = st.lists(edit, min_size=1, max_size=3).map(lambda edits: ("crafted", edits))
    corrupted = st.builds(
        lambda e, cut: ("bytes", _mutate(base_bytes.getvalue(), e, cut)),
        st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), max_size=6),
        st.none() | st.integers(0, len(base_bytes.getvalue())),
    )

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(crafted, corrupted))
    def run(example):
        kind, payload = example
        path = folder / "m.pt"
        if kind == "crafted":
            state = copy.deepcopy(base)
            for key_path, value, delete in payload:
                node = state
                for key in key_path[:-1]:
                    node = node.get(key) if isinstance(node, dict) else None
                if isinstance(node, dict):
                    if delete:
                        node.pop(key_path[-1], None)
                    else:
                        node[key_path[-1]] = value
            checkpoint.save(path, state)
        else:
            path.write_bytes(payload)
        try:
            loaded = checkpoint.load(path)
            Registrar(loaded, device="cpu")  # a file the schema accepts must build
        except (ModelError, InputError) as exc:
            assert "\n" not in str(exc), str(exc)
            TALLY["refused"] += 1
            return
        TALLY["accepted"] += 1

    run()


FUZZERS = {"transform": fuzz_transform, "landmarks": fuzz_landmarks, "model": fuzz_model}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reader", choices=(*FUZZERS, "all"), default="all")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in FUZZERS if args.reader == "all" else (args.reader,):
        TALLY.clear()
        FUZZERS[name](args.examples, args.seed)
        total = TALLY["accepted"] + TALLY["refused"]
        print(
            f"{name}: {total} examples, {TALLY['accepted']} accepted, {TALLY['refused']} refused", flush=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
