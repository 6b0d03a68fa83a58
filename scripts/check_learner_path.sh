#!/usr/bin/env bash
# The learner's path through Week 2 Day 4, in a scratch copy of the repository:
#   1. the skeleton in src/extensions/ builds as shipped (`build("learner")`), and the
#      learner-mode graders fail with the task messages (not with a crash or a build error);
#   2. with the reference's kernel sources copied into the skeleton, it rebuilds and the
#      learner-mode graders pass.
# Takes a few minutes (a clean build of the extension). Usage: scripts/check_learner_path.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
GRADERS="tests_refsol/test_week_2_day_4.py"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/tiny-llm-learner.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT

say() { printf '\n== %s\n' "$*"; }

say "copying the working tree to $SCRATCH"
# Tracked and new files, without what git ignores (builds, .so, .venv).
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
  tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | (cd "$SCRATCH" && tar -xf -)
cd "$SCRATCH"
# The scratch copy's packages shadow the editable install of the repository.
export PYTHONPATH="$SCRATCH/src${PYTHONPATH:+:$PYTHONPATH}"
export TINY_LLM_SOLUTION=tiny_llm

say "1. the skeleton builds as shipped"
start=$(date +%s)
"$PY" -m tiny_llm_common.build_ext learner
echo "clean build: $(($(date +%s) - start)) s"

say "1. learner-mode graders fail with the task messages"
if "$PY" -m pytest "$GRADERS" -q -p no:cacheprovider >"$SCRATCH/stage1.log" 2>&1; then
  cat "$SCRATCH/stage1.log"
  echo "FAIL: the untouched skeleton passed the graders" >&2
  exit 1
fi
for task in "task 1: implement Swiglu::eval_cpu" "task 3: implement encode_swiglu"; do
  if ! grep -q "Week 2 Day 4, $task" "$SCRATCH/stage1.log"; then
    tail -40 "$SCRATCH/stage1.log"
    echo "FAIL: no 'Week 2 Day 4, $task' message in the graders' output" >&2
    exit 1
  fi
done
if "$PY" -c "import metalsim" 2>/dev/null && ! grep -q "Week 2 Day 4, task 2" "$SCRATCH/stage1.log"; then
  tail -40 "$SCRATCH/stage1.log"
  echo "FAIL: no 'Week 2 Day 4, task 2' message for the untouched Metal kernels" >&2
  exit 1
fi
grep -E "^(FAILED|[0-9]+ (passed|failed))" "$SCRATCH/stage1.log" | tail -3

say "2. the reference's kernel sources in the skeleton"
for f in src/extensions/src/*; do
  ref="src/extensions_ref/src/$(basename "$f")"
  if [ -f "$ref" ] && ! cmp -s "$f" "$ref"; then
    cp "$ref" "$f"
    echo "copied $ref"
  fi
done
start=$(date +%s)
"$PY" -m tiny_llm_common.build_ext learner
echo "rebuild: $(($(date +%s) - start)) s"

say "2. learner-mode graders pass"
"$PY" -m pytest "$GRADERS" -q -p no:cacheprovider
echo "learner path OK"
