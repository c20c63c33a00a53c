#!/usr/bin/env bash
# The her2st walkthrough: C2 + C3 train, C4 held out; GE and no-GE models at the same budget,
# the DeepSpot-style predictor, and the paper's table on C4. Run from the repository root:
#   examples/her2st/run.sh            (her2st from $STMDIT_TEST_DATA/her2st, default ../shared/data)
set -euo pipefail
STMDIT=${STMDIT:-.venv/bin/stmdit}
HER2ST=${HER2ST:-${STMDIT_TEST_DATA:-../shared/data}/her2st}
if [ ! -f "$HER2ST/C2/counts.tsv.gz" ]; then
  echo "error: no her2st sections at $HER2ST (expected C2/, C3/, C4/ with counts.tsv.gz, spots.tsv, he.jpg); set HER2ST or STMDIT_TEST_DATA" >&2
  exit 1
fi
mkdir -p outputs/her2st
ln -sfn "$(cd "$HER2ST" && pwd)" outputs/her2st/data       # the configs read the sections from here

$STMDIT prepare examples/her2st/prepare.yaml
$STMDIT encode outputs/her2st/dataset --ge-encoder panel --morphology-encoder stain
$STMDIT train examples/her2st/train_ge.yaml
$STMDIT train examples/her2st/train_no_ge.yaml
$STMDIT train-predictor outputs/her2st/dataset --out outputs/her2st/predictor
$STMDIT evaluate examples/her2st/eval.yaml
