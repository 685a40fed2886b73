#!/usr/bin/env bash
# Leave-one-family-out: train on classic, on synth and on their mixture (same seeds), evaluate each model on the
# held-out cases of both families from the same starts; prints a Markdown table of mean TRE (docs/phantoms.md).
#
#   scripts/lofo.sh OUT                                     # full runs: hours on a CPU (see docs/phantoms.md)
#   CASES=12 TEST_CASES=4 PRESET=tiny EPOCHS=1 STEPS=2 BATCH=4 scripts/lofo.sh /tmp/lofo-smoke   # smoke run
#
# Environment: CASES (training cases per family, 200), TEST_CASES (held-out per family, 30), PRESET (default),
# DOF (3), EPOCHS (40), STEPS (steps per epoch, 0 = one pass), BATCH (32), SEED (training seed, 0),
# EVAL_SEED (seed of the starts, 1234), AIRREG (the airreg command).
set -euo pipefail
OUT=${1:?usage: scripts/lofo.sh OUT}
CASES=${CASES:-200} TEST_CASES=${TEST_CASES:-30} PRESET=${PRESET:-default} DOF=${DOF:-3}
EPOCHS=${EPOCHS:-40} STEPS=${STEPS:-0} BATCH=${BATCH:-32} SEED=${SEED:-0} EVAL_SEED=${EVAL_SEED:-1234}
AIRREG=${AIRREG:-airreg}
mkdir -p "$OUT"

# training data (phantom seed 1) and held-out data (phantom seed 2, never trained on) per family
for family in classic synth mixture; do
    [ -d "$OUT/data/train-$family" ] || $AIRREG phantom --family "$family" --out "$OUT/data/train-$family" \
        --cases "$CASES" --seed 1
done
for family in classic synth; do
    [ -d "$OUT/data/test-$family" ] || $AIRREG phantom --family "$family" --out "$OUT/data/test-$family" \
        --cases "$TEST_CASES" --seed 2
done

for family in classic synth mixture; do
    [ -f "$OUT/runs/$family/model.pt" ] || $AIRREG train --data "$OUT/data/train-$family" \
        --out "$OUT/runs/$family" --preset "$PRESET" --dof "$DOF" --epochs "$EPOCHS" \
        --steps-per-epoch "$STEPS" --batch-size "$BATCH" --seed "$SEED"
    for test in classic synth; do
        $AIRREG evaluate --data "$OUT/data/test-$test" --model "$OUT/runs/$family/model.pt" \
            --out "$OUT/eval/$family-on-$test" --dof "$DOF" --seed "$EVAL_SEED" --overlays 0 > /dev/null
    done
done

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| trained on | tested on | start mean TRE (mm) | one pass | iterative | worse than start |")
print("|---|---|---|---|---|---|")
for family in ("classic", "synth", "mixture"):
    for test in ("classic", "synth"):
        s = json.loads((out / "eval" / f"{family}-on-{test}" / "summary.json").read_text())
        print(f"| {family} | {test} | {s['tre_before']['mean']:.2f} | {s['tre_one_pass']['mean']:.2f} | "
              f"{s['tre_after']['mean']:.2f} | {100 * s['worse_than_start']:.0f} % |")
PY
