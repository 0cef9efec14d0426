#!/bin/bash
# The sweep of sweep.md, run from the repository root with fastmine importable:
#   bash benchmarks/results/amd-epyc-2026-12-03-block-sweep-v2/sweep.sh
# (the environment decides the clone: see sweep.md)
CF=";256,512;512,1024;256,1024"
for th in 2 1; do for rule in hard semihard; do
  for cell in "8192 32" "8192 128" "8192 512"; do set -- $cell
    python "$(dirname "$0")/sweep_cell.py" $th $2 "$CF" $rule 9
  done
done; done
