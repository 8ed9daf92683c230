#!/bin/sh
# The two agent experiments of docs/experiments.md ("Agents"), one step after another; a step whose result file
# exists is skipped, so the script resumes where it stopped (a killed training step resumes with --resume).
#   sh recipes/agents.sh            # results in runs/agent/
set -e
R=runs/agent
mkdir -p $R
step() {   # step NAME COMMAND...: run COMMAND unless $R/NAME.done exists
  name=$1; shift
  [ -f $R/$name.done ] && return 0
  echo "== $name: $* ($(date -u +%H:%M:%S), $(uptime | sed 's/.*load/load/'))" | tee -a $R/steps.log
  "$@" > $R/$name.log 2>&1
  touch $R/$name.done
}
MUL="--test-data recipes/data/multiply_test.jsonl --reward last_integer"
TOOL="--tools calculator --max-turns 3 --max-tokens 40 --max-total-tokens 160"
GUESS="--test-data recipes/data/guess_test.jsonl --reward last_integer --env recipes/guess_env.py:GuessNumber \
  --max-turns 7 --max-tokens 8 --max-total-tokens 200 --n 50"
step base_notool rft eval $MUL --max-tokens 32 --n 200 --output $R/base_notool.jsonl
step base_tool rft eval $MUL $TOOL --n 100 --output $R/base_tool.jsonl
step sft rft sft --config recipes/sft/tool_multiply.yaml --output $R/sft --overwrite
step sft_tool rft eval $MUL $TOOL --n 50 --adapter $R/sft/adapter --output $R/sft_tool.jsonl
step rft_train rft train --config recipes/tool_multiply.yaml --init-adapter $R/sft/adapter --output $R/rft \
  --time-budget 600 --resume
step rft_tool rft eval $MUL $TOOL --n 50 --adapter $R/rft/adapter --output $R/rft_tool.jsonl
step guess_base rft eval $GUESS --output $R/guess_base.jsonl
step guess_train rft train --config recipes/guess_number.yaml --output $R/guess --resume --time-budget 540
step guess_rft rft eval $GUESS --adapter $R/guess/adapter --output $R/guess_rft.jsonl
