#!/usr/bin/env bash
# Turns target/reliability.jsonl (appended by the fault tests through
# harness::pipeline::record_reliability after each exact source/target comparison) into the
# markdown table of docs/reliability.md: per scenario, the runs and trials so far, writes issued,
# lost and duplicated (0: a test records only once the target equals the source), the worst lane
# lag seen while recovering and the longest recovery.
#   scripts/reliability-report.sh [FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
file="${1:-target/reliability.jsonl}"
[ -s "$file" ] || { echo "no $file: run the fault tests first (cargo test -p tests)" >&2; exit 1; }
python3 - "$file" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    a = rows.setdefault(r["scenario"], {"runs": 0, "trials": 0, "writes": 0, "lost": 0,
                                         "duplicated": 0, "lag": 0.0, "recovery": 0.0})
    a["runs"] += 1
    a["trials"] += r["trials"]
    a["writes"] += r["writes"]
    a["lost"] += r["lost"]
    a["duplicated"] += r["duplicated"]
    a["lag"] = max(a["lag"], r["worst_lag_s"])
    a["recovery"] = max(a["recovery"], r["recovery_s"])
print("| scenario | test runs | faults injected | writes issued | lost | duplicated | worst lag (s) | longest recovery (s) |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for name, a in rows.items():
    print(f"| {name} | {a['runs']} | {a['trials']} | {a['writes']:,} | {a['lost']} | {a['duplicated']} | {a['lag']:.1f} | {a['recovery']:.1f} |")
PY
