#!/usr/bin/env bash
# Validate, sanitise and benchmark the CUDA kernels on a fresh GPU machine, in one go.
#
#   benchmarks/gpu_check.sh [--dry-run] OUTDIR
#
# Needs a CUDA build of torch, nvcc and ninja; not our venv. Steps, each under `timeout`,
# each carrying on when the one before failed, all within GPU_CHECK_BUDGET_S (570 s):
#   1. missing test dependencies (pip, only when some are missing and the network allows),
#      then `setup.py build_ext --inplace --force` for this card
#      (TORCH_CUDA_ARCH_LIST from the device, MAX_JOBS = all cores, CUDA_HOME from nvcc);
#   2. the whole test suite with CUDA present (the CUDA-parametrised tests and their
#      torch.library.opcheck must run: the summary counts them and the CUDA skips);
#   3. the CUDA op tests (`-k cuda`) under compute-sanitizer memcheck and racecheck;
#   4. every benchmarks/bench_*.py that takes --device, with --device cuda (--quick and
#      --json OUTDIR/<bench>.json where the script takes them, smaller sizes elsewhere);
#   5. a summary, printed last and written to OUTDIR/summary.txt; everything in OUTDIR is
#      also packed into OUTDIR/gpu_check_logs.tar.gz.
# It never changes the card's settings (nvidia-smi is only queried). Without a GPU, or with
# --dry-run, it runs the CPU-side logic only, prints "no GPU: skipping <step>" and exits 0.
# PYTHON (default python3) is the interpreter that holds torch.

set -u -o pipefail

usage() { echo "usage: $0 [--dry-run] OUTDIR" >&2; }

DRY=0
OUTDIR=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) usage; exit 2 ;;
        *)
            if [ -n "$OUTDIR" ]; then usage; exit 2; fi
            OUTDIR="$arg"
            ;;
    esac
done
if [ -z "$OUTDIR" ]; then usage; exit 2; fi

PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

BUDGET_S="${GPU_CHECK_BUDGET_S:-570}" # the whole run; the machine allows 600 s per command
RESERVE_S=15                          # kept back for the summary and the archive
START_S=$SECONDS
SUMMARY=()
STATUS=0 # 1 once something failed (a dry run always exits 0)

log() { echo "[gpu_check $((SECONDS - START_S))s] $*"; }
note() { SUMMARY+=("$*"); }
# Seconds a step may take: its cap, or what is left of the budget. Fails (and logs) when
# fewer than 10 s are left, so the caller skips the step.
step_time() {
    local cap=$1 what=$2 left
    left=$((BUDGET_S - (SECONDS - START_S) - RESERVE_S))
    if [ "$left" -lt 10 ]; then
        log "skipping $what: the ${BUDGET_S} s budget is spent"
        note "$what: skipped, budget spent"
        return 1
    fi
    if [ "$cap" -lt "$left" ]; then echo "$cap"; else echo "$left"; fi
}
# timeout's 124/137 means the step ran out of time
said_rc() { case "$1" in 0) echo "ok" ;; 124 | 137) echo "timed out" ;; *) echo "exit $1" ;; esac; }

log "collapse_ext GPU check in $ROOT, logs in $OUTDIR, budget ${BUDGET_S} s"

# ---- the machine -------------------------------------------------------------------------
GPU=0
# (--dry-run does not probe CUDA: without a driver that alone takes seconds)
TORCH_INFO="$(GPU_CHECK_DRY=$DRY "$PYTHON" - <<'EOF' 2>&1
import os
import torch
ok = os.environ["GPU_CHECK_DRY"] == "0" and torch.cuda.is_available()
cap = "%d.%d" % torch.cuda.get_device_capability() if ok else "-"
name = torch.cuda.get_device_name() if ok else "-"
print(int(ok), cap, torch.__version__, torch.version.cuda, name)
EOF
)"
read -r HAVE_CUDA CAPABILITY TORCH_VERSION TORCH_CUDA GPU_NAME <<<"$(tail -n 1 <<<"$TORCH_INFO")"
if [ "${HAVE_CUDA:-}" = "1" ] || [ "${HAVE_CUDA:-}" = "0" ]; then
    log "torch $TORCH_VERSION (CUDA $TORCH_CUDA), GPU: $GPU_NAME"
else
    log "could not import torch with $PYTHON: $TORCH_INFO"
    HAVE_CUDA=0 CAPABILITY="-" GPU_NAME="-"
fi
if [ "$DRY" = 1 ]; then
    log "--dry-run: the GPU steps are skipped"
elif [ "$HAVE_CUDA" = 1 ]; then
    GPU=1
else
    log "torch.cuda.is_available() is false: running as --dry-run"
fi
note "machine: ${GPU_NAME} (capability ${CAPABILITY}), torch ${TORCH_VERSION:-?}, $(nproc) cores"

# nvcc: $CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc, else the one on PATH with its
# links resolved (a /usr/local/bin/nvcc may be a wrapper); CUDA_HOME is the folder above bin/.
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    NVCC="$CUDA_HOME/bin/nvcc"
elif [ -x /usr/local/cuda/bin/nvcc ]; then
    NVCC=/usr/local/cuda/bin/nvcc
else
    NVCC="$(command -v nvcc || true)"
    if [ -n "$NVCC" ]; then NVCC="$(readlink -f "$NVCC")"; fi
fi
if [ -n "$NVCC" ]; then CUDA_HOME="$(dirname "$(dirname "$NVCC")")"; fi
SANITIZER="$(command -v compute-sanitizer || true)"
if [ -z "$SANITIZER" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
    SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
fi
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo '?')"
    echo "python: $PYTHON ($("$PYTHON" --version 2>&1))"
    echo "torch: $TORCH_INFO"
    echo "nvcc: ${NVCC:-none} ${NVCC:+($("$NVCC" --version 2>&1 | tail -n 1))}"
    echo "CUDA_HOME: ${CUDA_HOME:-none}"
    echo "compute-sanitizer: ${SANITIZER:-none}"
    echo "ninja: $(command -v ninja || echo none)"
    echo "cores: $(nproc)"
    if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | head -n 20; fi # query only
} >"$OUTDIR/env.txt" 2>&1

# ---- 1a. test dependencies -----------------------------------------------------------------
# module:pip name; a test file that imports a module still missing at top level is left out
# (the others importorskip theirs).
DEPS="pytest:pytest numpy:numpy hypothesis:hypothesis matplotlib:matplotlib sklearn:scikit-learn
safetensors:safetensors h5py:h5py tqdm:tqdm transformers:transformers"
missing_modules() {
    local m out=()
    for m in $DEPS; do
        "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${m%%:*}') is None)" \
            2>/dev/null || out+=("$m")
    done
    echo "${out[*]}"
}
MISSING="$(missing_modules)"
if [ -n "$MISSING" ]; then
    PIP_NAMES="$(for m in $MISSING; do printf '%s ' "${m#*:}"; done)"
    if [ "$GPU" = 0 ]; then
        log "missing test dependencies: $PIP_NAMES(a GPU run would try pip)"
    elif t=$(step_time 60 "pip install"); then
        log "pip install $PIP_NAMES(torch pinned to $TORCH_VERSION)"
        echo "torch==$TORCH_VERSION" >"$OUTDIR/constraints.txt"
        # shellcheck disable=SC2086 # one word per package
        timeout -k 5 "$t" "$PYTHON" -m pip install -q --timeout 5 --retries 0 \
            -c "$OUTDIR/constraints.txt" $PIP_NAMES >"$OUTDIR/pip.log" 2>&1
        log "pip: $(said_rc $?) (no network is no failure: those tests are left out)"
        MISSING="$(missing_modules)"
    fi
fi
IGNORE=()
NO_PYTEST=0
for m in $MISSING; do
    mod="${m%%:*}"
    if [ "$mod" = pytest ]; then NO_PYTEST=1; continue; fi
    while IFS= read -r f; do
        IGNORE+=("--ignore=$f")
    done < <(grep -lE "^(import|from) $mod([ .]|$)" tests/*.py 2>/dev/null)
done
if [ -n "$MISSING" ]; then
    note "missing test deps: $(for m in $MISSING; do printf '%s ' "${m#*:}"; done)(left out: ${IGNORE[*]:-none})"
else
    note "test deps: all importable"
fi

# ---- 1b. build -----------------------------------------------------------------------------
ARCH="$CAPABILITY"
JOBS="$(nproc)"
BUILD_ENV=(FORCE_CUDA=1 "CUDA_HOME=${CUDA_HOME:-}" "TORCH_CUDA_ARCH_LIST=$ARCH" "MAX_JOBS=$JOBS")
BUILD_CMD=("$PYTHON" setup.py build_ext --inplace --force)
BUILT=0
if [ "$GPU" = 0 ]; then
    log "no GPU: skipping build (would run: ${BUILD_ENV[*]} ${BUILD_CMD[*]})"
    note "build: not run (no GPU)"
elif [ -z "$NVCC" ]; then
    log "no nvcc found: skipping build"
    note "build: FAILED, no nvcc"
    STATUS=1
elif t=$(step_time 300 build); then
    log "build: ${BUILD_ENV[*]} ${BUILD_CMD[*]} (at most $t s)"
    env "${BUILD_ENV[@]}" timeout -k 5 "$t" "${BUILD_CMD[@]}" >"$OUTDIR/build.log" 2>&1
    rc=$?
    compiled="$("$PYTHON" -c 'import collapse_ext; print(collapse_ext.cuda_compiled())' 2>>"$OUTDIR/build.log")"
    log "build: $(said_rc $rc), cuda_compiled() = ${compiled:-import failed}"
    if [ "$rc" = 0 ] && [ "$compiled" = True ]; then
        BUILT=1
        note "build: ok for sm_${ARCH/./} in $(grep -c . "$OUTDIR/build.log") log lines (build.log)"
    else
        note "build: FAILED ($(said_rc $rc), cuda_compiled=${compiled:-?}; see build.log)"
        STATUS=1
    fi
fi

# ---- 2. the test suite ---------------------------------------------------------------------
# Counts from a JUnit XML: passed failed errors skipped, the tests run on cuda (passed/all),
# the opcheck tests passed on cuda, and the skips whose reason is "needs a CUDA device".
junit_counts() {
    "$PYTHON" - "$1" <<'EOF'
import re, sys, xml.etree.ElementTree as ET
cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
n = dict(passed=0, failed=0, errors=0, skipped=0, cuda=0, cuda_passed=0, opcheck_cuda=0, cuda_skips=0)
for c in cases:
    kind = "passed"
    for child in c:
        if child.tag in ("failure", "error", "skipped"):
            kind = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
            if kind == "skipped" and "needs a CUDA device" in (child.get("message") or ""):
                n["cuda_skips"] += 1
    n[kind] += 1
    if re.search(r"[\[-]cuda[\]-]", c.get("name", "")):
        n["cuda"] += 1
        if kind == "passed":
            n["cuda_passed"] += 1
            n["opcheck_cuda"] += c.get("name", "").startswith("test_opcheck")
print(" ".join(str(n[k]) for k in n))
EOF
}
# Last line of pytest's -q output ("3 failed, 120 passed, 2 skipped in 9.1s") from a log.
pytest_tail() { grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)' "$1" | tail -n 1 | tr -d '='; }

PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider)
if [ "$GPU" = 0 ]; then
    log "no GPU: skipping test suite (would run: ${PYTEST[*]} -rs --junitxml=OUTDIR/pytest.xml tests)"
    note "tests: not run (no GPU)"
elif [ "$NO_PYTEST" = 1 ]; then
    log "pytest is not importable: skipping test suite"
    note "tests: not run, pytest missing"
    STATUS=1
elif [ "$BUILT" = 0 ]; then
    log "the CUDA build failed: skipping test suite"
    note "tests: not run, the build failed"
elif t=$(step_time 180 "test suite"); then
    log "test suite (at most $t s)"
    timeout -k 5 "$t" "${PYTEST[@]}" -rs --junitxml="$OUTDIR/pytest.xml" tests "${IGNORE[@]}" \
        >"$OUTDIR/tests.log" 2>&1
    rc=$?
    log "test suite: $(said_rc $rc): $(pytest_tail "$OUTDIR/tests.log")"
    counts=""
    if [ -s "$OUTDIR/pytest.xml" ]; then counts="$(junit_counts "$OUTDIR/pytest.xml" 2>>"$OUTDIR/tests.log")"; fi
    if read -r P F E S C CP OC CS <<<"$counts" && [ -n "${CS:-}" ]; then
        note "tests: $P passed, $F failed, $E errors, $S skipped ($(said_rc $rc); tests.log, pytest.xml)"
        note "cuda tests: $CP of $C passed; opcheck on cuda: $OC passed; skipped 'needs a CUDA device': $CS"
        if [ "$CS" = 0 ] && [ "$C" -gt 0 ]; then
            note "CUDA-parametrised tests ran: 0 skipped for want of a CUDA device"
        else
            note "WARNING: CUDA tests did not all run ($C collected on cuda, $CS skipped for want of a device)"
            STATUS=1
        fi
        if [ "$F" != 0 ] || [ "$E" != 0 ]; then STATUS=1; fi
    else
        note "tests: $(said_rc $rc), no JUnit XML (tests.log: $(pytest_tail "$OUTDIR/tests.log"))"
        STATUS=1
    fi
    [ "$rc" = 0 ] || STATUS=1
fi

# ---- 3. compute-sanitizer -------------------------------------------------------------------
SAN_FILES="tests/test_class_accumulate.py tests/test_class_stats.py tests/test_within_scatter.py
tests/test_pairwise_stats.py tests/test_nearest_centre.py tests/test_lpm_step.py"
# The sanitizer's own count: the sum of its "ERROR SUMMARY: N errors" lines, or, when it was
# cut off before printing one, the error reports seen so far (a lower bound).
sanitizer_errors() {
    local log=$1 sum
    sum="$(grep -oE 'ERROR SUMMARY: [0-9]+' "$log" | awk '{s += $3} END {if (NR) print s}')"
    if [ -n "$sum" ]; then
        echo "$sum"
    else
        echo "at least $(grep -cE '^========= (Invalid|Error|Program hit|Race|.*[Hh]azard)' "$log") (no ERROR SUMMARY: cut off)"
    fi
}
for tool in memcheck racecheck; do
    if [ "$GPU" = 0 ]; then
        log "no GPU: skipping compute-sanitizer --tool $tool"
        note "sanitizer $tool: not run (no GPU)"
    elif [ -z "$SANITIZER" ]; then
        log "compute-sanitizer not found: skipping $tool"
        note "sanitizer $tool: not run, compute-sanitizer not found"
        STATUS=1
    elif [ "$BUILT" = 0 ] || [ "$NO_PYTEST" = 1 ]; then
        log "no CUDA build or no pytest: skipping $tool"
        note "sanitizer $tool: not run (no build or no pytest)"
    elif t=$(step_time 100 "sanitizer $tool"); then
        log "compute-sanitizer --tool $tool on the CUDA op tests (at most $t s)"
        # no caching allocator under memcheck: an overrun past a tensor then leaves its allocation
        # shellcheck disable=SC2086 # one word per file
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$t" "$SANITIZER" --tool "$tool" \
            --target-processes all --print-limit 50 \
            "${PYTEST[@]}" -k cuda $SAN_FILES >"$OUTDIR/$tool.log" 2>&1
        rc=$?
        errs="$(sanitizer_errors "$OUTDIR/$tool.log")"
        log "$tool: $(said_rc $rc), sanitizer errors: $errs"
        note "sanitizer $tool: $errs errors ($(said_rc $rc); tests: $(pytest_tail "$OUTDIR/$tool.log"); $tool.log)"
        [ "$errs" = 0 ] || STATUS=1
    fi
done

# ---- 4. benchmarks ----------------------------------------------------------------------------
# One benchmark command ($4...: a script and its arguments): without a GPU or a build it is
# noted as not run; else it runs within $3 seconds (and the budget) into OUTDIR/$2.log and
# its headline rows go into the summary under the label $1.
run_bench() {
    local label=$1 log_name=$2 cap=$3 t rc json rows line
    shift 3
    if [ "$GPU" = 0 ]; then
        log "no GPU: skipping $label (would run: timeout $cap $PYTHON $*)"
        note "$label: not run (no GPU)"
    elif [ "$BUILT" = 0 ]; then
        note "$label: not run, the build failed"
    elif t=$(step_time "$cap" "$label"); then
        log "$label: $* (at most $t s)"
        timeout -k 5 "$t" "$PYTHON" "$@" >"$OUTDIR/$log_name.log" 2>&1
        rc=$?
        log "$label: $(said_rc $rc)"
        json=""
        if [ -s "$OUTDIR/$log_name.json" ]; then json=", $log_name.json"; fi
        note "$label: $(said_rc $rc) ($log_name.log$json)"
        # headline rows: a markdown table's header and first rows, else the last lines
        rows="$(grep -E '^\|' "$OUTDIR/$log_name.log" | grep -vE '^\|(-+\|)+$' | head -n 4)"
        [ -n "$rows" ] || rows="$(grep -v '^[[:space:]]*$' "$OUTDIR/$log_name.log" | tail -n 2)"
        while IFS= read -r line; do note "    ${line:0:220}"; done <<<"$rows"
        [ "$rc" = 0 ] || STATUS=1
    fi
}

# The language-model issue's GPU target first: pairwise statistics of K = 250 000 rows,
# d = 4096 (a 4 GB input; the plain K x K way, 250 GB, is not run) in under 10 s on an H100.
run_bench "target pairwise_stats K=250000 d=4096 (< 10 s on an H100)" pairwise_250k 150 \
    benchmarks/bench_metrics.py --device cuda --ks 250000 --max-k 250000 --pairwise-d 4096 --repeats 1 \
    --nearest-n 1000 --json "$OUTDIR/pairwise_250k.json"

# Smaller sizes for the benchmarks that have no --quick (only options each script has).
quick_args() {
    case "$1" in
        bench_analyze) echo "--n 50000" ;;
        bench_lpm_solve) echo "--instances 512" ;;
        bench_lpm_solve_large) echo "--K 300" ;;
        bench_metrics) echo "--max-k 10000 --repeats 3" ;;
        bench_monitor) echo "--repeats 3" ;;
    esac
}
BENCHES=()
for f in benchmarks/bench_*.py; do
    name="$(basename "$f" .py)"
    if ! grep -q '"--device"' "$f"; then
        log "$name: no --device option, skipped"
        continue
    fi
    args=(--device cuda)
    if grep -q '"--quick"' "$f"; then args+=(--quick); fi
    if grep -q '"--json"' "$f"; then args+=(--json "$OUTDIR/$name.json"); fi
    read -ra qa <<<"$(quick_args "$name")" # "--option value" pairs
    for ((i = 0; i + 1 < ${#qa[@]}; i += 2)); do
        if grep -q "\"${qa[i]}\"" "$f"; then
            args+=("${qa[i]}" "${qa[i + 1]}")
        else
            log "$name: has no ${qa[i]} option any more (left out)"
        fi
    done
    BENCHES+=("$name")
    run_bench "benchmark $name" "$name" 60 "$f" "${args[@]}"
done
[ "${#BENCHES[@]}" -gt 0 ] || note "benchmarks: none take --device"

# ---- 5. summary ---------------------------------------------------------------------------------
{
    echo
    echo "==== collapse_ext GPU check summary ($((SECONDS - START_S)) s of ${BUDGET_S} s) ===="
    if [ "$GPU" = 0 ]; then
        echo "DRY RUN (no GPU or --dry-run): only the CPU-side logic ran; nothing was built, tested or timed"
    fi
    printf '%s\n' "${SUMMARY[@]}"
    if [ "$GPU" = 1 ]; then
        if [ "$STATUS" = 0 ]; then echo "result: all steps passed"; else echo "result: FAILURES above"; fi
    fi
    echo "logs: $OUTDIR (all of them in gpu_check_logs.tar.gz)"
} | tee "$OUTDIR/summary.txt"
ARCHIVE="$(mktemp)"
if tar -czf "$ARCHIVE" -C "$OUTDIR" --exclude gpu_check_logs.tar.gz . 2>/dev/null; then
    chmod 644 "$ARCHIVE" && mv "$ARCHIVE" "$OUTDIR/gpu_check_logs.tar.gz"
else
    rm -f "$ARCHIVE"
    echo "could not pack $OUTDIR into gpu_check_logs.tar.gz" >&2
fi
if [ "$GPU" = 0 ]; then exit 0; fi
exit "$STATUS"
