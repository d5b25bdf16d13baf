#!/usr/bin/env bash
# One GPU session in one command (the logic is benchmarks/gpu_session.py): every Triton kernel checked
# against its torch reference, CSA / HCA prefill and decode against dense SDPA at 32K and 128K, a
# 1M-token CSA layer, and a training step at 32K and 64K, in one markdown report.
#
#   bash benchmarks/gpu_session.sh                              # on a CUDA machine, about 8 minutes
#   bash benchmarks/gpu_session.sh --cpu-smoke --out /tmp/x.md  # the same code path on a CPU, toy shapes
#   bash benchmarks/gpu_session.sh --help                       # every option of gpu_session.py
#
# Arguments go to gpu_session.py as they are, except --out (default gpu_session.md), which is taken
# relative to the directory this is called from. The report is that file; everything the run prints
# (progress on stderr, then the report) is also teed into the same name with .log for .md.
# PYTHON picks the interpreter (default: the repository's .venv if it has one, else python3).
# The exit status is gpu_session.py's: 0 when every kernel check passed, 1 when one did not, 2 for a
# usage error or no CUDA device.
set -uo pipefail

caller=$PWD
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

out=gpu_session.md
args=()
while (($#)); do
  case $1 in
    --out)
      if (($# < 2)); then
        echo "gpu_session.sh: --out needs a path" >&2
        exit 2
      fi
      out=$2
      shift 2
      ;;
    --out=*)
      out=${1#--out=}
      shift
      ;;
    *)
      args+=("$1")
      shift
      ;;
  esac
done
[[ $out == /* ]] || out=$caller/$out

cd "$root" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # the package, without installing it
export PYTHONUNBUFFERED=1  # progress lines reach the log as they happen
python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

"$python" benchmarks/gpu_session.py ${args[@]+"${args[@]}"} --out "$out" 2>&1 | tee "${out%.md}.log"
exit "${PIPESTATUS[0]}"
