#!/usr/bin/env bash
# package.sh - make this worker directory self-contained for hosts that lack the system
# shared libraries the CPU build of vLLM needs. Run after ./install.sh (`make package`).
#
#   ./package.sh            bundle the required libraries into ./lib and report what
#                           else the venv's native code takes from the system
#   ./package.sh --help
#
# What it does
#   1. Bundles, into ./lib (which run.sh puts first on LD_LIBRARY_PATH):
#        libnuma.so.1  vLLM's CPU extension (vllm/_C*.abi3.so) has it as DT_NEEDED, so
#                      `import vllm._C` fails without it. Debian/Ubuntu: libnuma1.
#        libgomp.so.1  the GNU OpenMP runtime (torch's CPU kernels). Debian/Ubuntu: libgomp1.
#      Symlinks are followed to the real file, which is copied under its real name; the
#      soname symlink (libnuma.so.1 -> libnuma.so.1.0.0) is recreated next to it.
#      Idempotent: a file already identical in ./lib is left alone; stale copies are
#      replaced.
#
#   Where each copy comes from (the policy):
#      The venv's own copy wins when the venv ships the library under its exact soname
#      (the torch wheel ships torch/lib/libgomp.so.1; nothing in the venv ships libnuma).
#      Reason: the loader searches LD_LIBRARY_PATH *before* a library's DT_RUNPATH, so
#      whatever sits in ./lib replaces the copy torch would load through its RUNPATH
#      $ORIGIN. Bundling torch's own file keeps the OpenMP runtime torch was built and
#      tested with, and keeps one single libgomp in the process. It is also the one the
#      engine processes run whatever ./lib holds: vLLM's CPU platform puts torch's
#      libgomp into LD_PRELOAD before spawning them (vllm issue 27369; see the harness's
#      bundled-libs check, tests/e2e/harness.py). Copies that auditwheel
#      renamed (libgomp-<hash>.so.1.0.0, e.g. sentencepiece.libs/, or torch.libs/ on
#      aarch64) have another soname, satisfy no `libgomp.so.1` lookup, and are not used.
#      Otherwise the system's copy is taken: the x86_64 / aarch64 multiarch directories
#      (/usr/lib/<arch>-linux-gnu, /lib/<arch>-linux-gnu), then /usr/lib64, /lib64,
#      /usr/lib, /lib, then `ldconfig -p`.
#      A required library found nowhere is a hard error, with the package to install.
#
#   2. Runs `ldd` (with ./lib first on LD_LIBRARY_PATH, as run.sh does) over every
#      shared object under the venv's site-packages (vllm, torch, numpy, ...) and reports:
#        - libraries resolved from system paths outside the BASE set below: a minimal
#          host must provide them (they are reported, not bundled);
#        - "not found" entries, split into those a file inside the venv provides (e.g.
#          vllm/_C has no RUNPATH, so ldd cannot find its libtorch.so; at run time
#          `import torch` has loaded it already and the loader matches it by soname)
#          and those found
#          nowhere (real gaps: harmless only if that module is never imported).
#
#   BASE: what every glibc host has, so never bundled nor reported:
#      glibc itself (Debian libc6): libc, libm, libpthread, libdl, librt, libutil,
#      libresolv, libanl, libnsl, ld-linux*, the vdso, and libcrypt.so.1 (libcrypt1,
#      "Priority: required");
#      the GCC runtime: libgcc_s.so.1 and libstdc++.so.6. A minimal Debian/Ubuntu image
#      has both (libgcc-s1 is a dependency of libc6; libstdc++6 one of apt), and the
#      manylinux wheel policy pip's wheels are built to assumes them on the host.
#   libz.so.1 is deliberately NOT in the base set: it is reported (zlib1g is
#   "Priority: required" on Debian/Ubuntu, so present there, but not on e.g. distroless).
#
# Exit status: 0 when ./lib holds every required library (the ldd report is
# informational), 1 when a required library cannot be found or ./venv is missing.

set -euo pipefail

DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
VENV="$DIR/venv"
VPY="$VENV/bin/python"
LIB="$DIR/lib"

# soname -> the Debian/Ubuntu and the Fedora/RHEL package that provide it (for errors).
declare -A REQUIRED=(
  [libnuma.so.1]=libnuma1
  [libgomp.so.1]=libgomp1
)
declare -A REQUIRED_RPM=(
  [libnuma.so.1]=numactl-libs
  [libgomp.so.1]=libgomp
)
REQUIRED_ORDER=(libnuma.so.1 libgomp.so.1)

BASE_RE='^(libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|libutil\.so\.1|libresolv\.so\.2|libanl\.so\.1|libnsl\.so\.1|libcrypt\.so\.1|ld-linux[-a-z0-9_.]*\.so\.[0-9]+|linux-vdso\.so\.1|linux-gate\.so\.1|libgcc_s\.so\.1|libstdc\+\+\.so\.6)$'

log() { printf '[package.sh] %s\n' "$*"; }
warn() { printf '[package.sh] WARNING: %s\n' "$*" >&2; }
die() {
  printf '[package.sh] ERROR: %s\n' "$*" >&2
  exit 1
}

case "${1:-}" in
  -h | --help)
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    exit 0
    ;;
  "") ;;
  *) die "unknown argument: $1 (see --help)" ;;
esac

[[ -x "$VPY" ]] || die "$VPY not found: run ./install.sh (or make install) first"
command -v ldd >/dev/null || die "ldd not found (Debian/Ubuntu: libc-bin)"

SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
[[ -d "$SITE" ]] || die "site-packages not found: $SITE"

case "$(uname -m)" in
  x86_64 | amd64) MULTIARCH=x86_64-linux-gnu LDCONFIG_TAG='x86-64' ;;
  aarch64 | arm64) MULTIARCH=aarch64-linux-gnu LDCONFIG_TAG='AArch64' ;;
  *) MULTIARCH="$(uname -m)-linux-gnu" LDCONFIG_TAG='' ;;
esac
SYSTEM_DIRS=("/usr/lib/$MULTIARCH" "/lib/$MULTIARCH" /usr/lib64 /lib64 /usr/lib /lib)

# ------------------------------------------------------------------------------------
# finding a required library
# ------------------------------------------------------------------------------------

# A copy the venv ships under the exact soname (file or symlink named so), torch first.
find_in_venv() {
  local soname="$1" hit
  for hit in "$SITE/torch/lib/$soname" "$SITE/vllm/lib/$soname" "$SITE/vllm.libs/$soname"; do
    [[ -e "$hit" ]] && {
      echo "$hit"
      return 0
    }
  done
  hit="$(find "$SITE" -name "$soname" \( -type f -o -type l \) -print 2>/dev/null | sort | head -n 1)"
  [[ -n "$hit" ]] && echo "$hit"
}

find_in_system() {
  local soname="$1" d
  for d in "${SYSTEM_DIRS[@]}"; do
    [[ -e "$d/$soname" ]] && {
      echo "$d/$soname"
      return 0
    }
  done
  if command -v ldconfig >/dev/null 2>&1 || [[ -x /sbin/ldconfig ]]; then
    local ldc
    ldc="$(command -v ldconfig || echo /sbin/ldconfig)"
    "$ldc" -p 2>/dev/null | awk -v so="$soname" -v tag="$LDCONFIG_TAG" \
      '$1 == so && (tag == "" || index($0, tag)) { print $NF; exit }'
  fi
}

# Copy the real file behind $src into ./lib and point the soname symlink at it.
bundle() {
  local soname="$1" src="$2" origin="$3" real name
  real="$(readlink -f "$src")"
  name="$(basename "$real")"
  if command -v readelf >/dev/null 2>&1; then
    local got
    got="$(readelf -d "$real" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
    [[ -z "$got" || "$got" == "$soname" ]] ||
      die "$real has SONAME $got, expected $soname"
  fi
  # Remove other versions of this library left from an earlier run (another source).
  local old
  for old in "$LIB/${soname}".*; do
    [[ -e "$old" || -L "$old" ]] || continue
    [[ "$(basename "$old")" == "$name" ]] && continue
    rm -f "$old"
    log "removed stale $(basename "$old")"
  done
  if [[ -f "$LIB/$name" && ! -L "$LIB/$name" ]] && cmp -s "$real" "$LIB/$name"; then
    log "$soname: up to date: lib/$name (from $origin $real)"
  else
    rm -f "$LIB/$name"
    cp -p "$real" "$LIB/$name.tmp.$$"
    chmod 0755 "$LIB/$name.tmp.$$"
    mv -f "$LIB/$name.tmp.$$" "$LIB/$name"
    log "$soname: copied $origin $real -> lib/$name"
  fi
  if [[ "$name" != "$soname" ]]; then
    if [[ "$(readlink "$LIB/$soname" 2>/dev/null)" != "$name" ]]; then
      rm -f "$LIB/$soname"
      ln -s "$name" "$LIB/$soname"
      log "$soname: symlink lib/$soname -> $name"
    fi
  fi
}

# ------------------------------------------------------------------------------------
# 1. bundle
# ------------------------------------------------------------------------------------
mkdir -p "$LIB"
missing=()
for soname in "${REQUIRED_ORDER[@]}"; do
  src="$(find_in_venv "$soname" || true)"
  origin=venv
  if [[ -z "$src" ]]; then
    src="$(find_in_system "$soname" || true)"
    origin=system
  fi
  if [[ -z "$src" ]]; then
    missing+=("$soname")
    continue
  fi
  bundle "$soname" "$src" "$origin"
done
if ((${#missing[@]})); then
  pkgs=() rpms=()
  for so in "${missing[@]}"; do
    pkgs+=("${REQUIRED[$so]}")
    rpms+=("${REQUIRED_RPM[$so]:-?}")
  done
  printf '[package.sh] ERROR: required librar%s not found in the venv nor on this system: %s\n' \
    "$( ((${#missing[@]} > 1)) && echo ies || echo y)" "${missing[*]}" >&2
  printf '[package.sh]        searched %s and ldconfig -p\n' "${SYSTEM_DIRS[*]}" >&2
  printf '[package.sh]        install them, then run ./package.sh again:\n' >&2
  printf '[package.sh]          Debian/Ubuntu: apt-get update && apt-get install -y %s\n' "${pkgs[*]}" >&2
  printf '[package.sh]          Fedora/RHEL:   dnf install -y %s\n' "${rpms[*]}" >&2
  exit 1
fi

# ------------------------------------------------------------------------------------
# 2. what else comes from the system (ldd over the venv's native code)
# ------------------------------------------------------------------------------------
log "scanning shared objects under ${SITE#"$DIR/"} with ldd (LD_LIBRARY_PATH=lib) ..."
scan="$(mktemp)"
trap 'rm -f "$scan"' EXIT
nfiles=0
while IFS= read -r -d '' so; do
  nfiles=$((nfiles + 1))
  # ldd prints "  libx.so.1 => /path (0x..)" or "  libx.so.1 => not found".
  LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$so" 2>/dev/null |
    awk -v f="${so#"$SITE/"}" '$2 == "=>" { print f "\t" $1 "\t" ($3 == "not" ? "NOTFOUND" : $3) }' \
      >>"$scan" || true
done < <(find "$SITE" \( -name '*.so' -o -name '*.so.*' \) -type f -print0)
log "scanned $nfiles shared objects"

bundled=() system_libs=() venv_provided=() nowhere=()
while IFS=$'\t' read -r soname path; do
  if [[ "$path" == "$LIB/"* ]]; then
    bundled+=("$soname")
  elif [[ "$path" == NOTFOUND ]]; then
    provider="$(find "$SITE" -name "$soname" \( -type f -o -type l \) -print 2>/dev/null | head -n 1)"
    if [[ -n "$provider" ]]; then
      venv_provided+=("$soname (in ${provider#"$SITE/"})")
    else
      nowhere+=("$soname")
    fi
  elif [[ "$path" != "$SITE/"* && "$path" != "$VENV/"* ]] && ! [[ "$soname" =~ $BASE_RE ]]; then
    system_libs+=("$soname => $path")
  fi
done < <(cut -f2,3 "$scan" | sort -u)

users() { # users SONAME RESOLUTION: the objects for which ldd resolved SONAME so (first 3)
  awk -F'\t' -v s="$1" -v r="$2" '$2 == s && $3 == r { print $1 }' "$scan" | sort -u |
    awk 'NR <= 3 { printf "%s%s", (NR > 1 ? ", " : ""), $0 } END { if (NR > 3) printf ", ... (%d in all)", NR }'
}
deb_package() { # the dpkg package owning a path, if dpkg knows
  command -v dpkg >/dev/null 2>&1 || return 0
  local p real out
  real="$(readlink -f "$1")"
  for p in "$1" "$real" "${1/#\/lib\//\/usr\/lib\/}" "${real/#\/lib\//\/usr\/lib\/}"; do
    out="$(dpkg -S "$p" 2>/dev/null | head -n 1 | cut -d: -f1)" || true
    [[ -n "$out" ]] && {
      echo "$out"
      return 0
    }
  done
  return 0
}

log "bundled in lib/ and resolved there: ${bundled[*]:-none}"
if ((${#system_libs[@]})); then
  log "taken from the system, outside the glibc/libgcc_s/libstdc++ base (a minimal host must have these):"
  for entry in "${system_libs[@]}"; do
    so="${entry%% =>*}"
    pkg="$(deb_package "${entry##*=> }")"
    log "  $entry${pkg:+ [deb $pkg]} <- $(users "$so" "${entry##*=> }")"
  done
else
  log "taken from the system outside the base set: none"
fi
if ((${#venv_provided[@]})); then
  log "'not found' by ldd but shipped inside the venv (loaded by soname once its owner is imported):"
  for entry in "${venv_provided[@]}"; do log "  ${entry} <- $(users "${entry%% *}" NOTFOUND)"; done
fi
if ((${#nowhere[@]})); then
  warn "'not found' by ldd and not shipped in the venv (only a problem if that module is imported):"
  for so in "${nowhere[@]}"; do warn "  $so <- $(users "$so" NOTFOUND)"; done
else
  log "not found anywhere: none"
fi

log "lib/ now holds:"
for f in "$LIB"/*; do
  if [[ -L "$f" ]]; then
    log "  $(basename "$f") -> $(readlink "$f")"
  else
    log "  $(basename "$f") ($(stat -c %s "$f") bytes, sha256 $(sha256sum "$f" | cut -c1-12))"
  fi
done
log "done: run.sh puts $LIB first on LD_LIBRARY_PATH"
