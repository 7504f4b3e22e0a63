#!/usr/bin/env bash
# The main job: set up, then run the Dense / Masked 30 % / CSR 30 % comparison notebook on the embedded
# model in a real kernel; writes results/ (CSV, HTML report, executed notebook) and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/run_notebook.py examples/01_dense_masked_csr.ipynb --cwd . --out results/01_dense_masked_csr.ipynb
.venv/bin/python - <<'PY'
import pandas as pd
pd.set_option("display.width", 200)
table = pd.read_csv("results/01_dense_masked_csr.csv")
columns = ["setup", "size_mb", "sparsity_prunable", "sparsity_model", "compute_ratio", "executed_ratio",
           "top1_match", "perplexity", "prefill_ms", "decode_ms", "prefill_speedup", "decode_speedup"]
print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
print("\nWrote results/01_dense_masked_csr.csv, results/01_report.html, results/01_dense_masked_csr.ipynb")
PY
