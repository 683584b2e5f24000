"""install.sh gives uv what pip's configuration says, or lets pip install.

uv reads neither pip.conf nor PIP_* variables, where mirrors, local wheel directories,
constraints and CA files are set; install.sh asks the venv's pip for its configuration
and turns it into uv's arguments (`./install.sh --uv-plan` prints them). A setting
dropped on the way would install from the wrong place or fail where pip works.

The machine's own pip configuration (/etc/pip.conf and the like) is read too; each test
adds its settings through PIP_CONFIG_FILE (read last) and PIP_* variables and looks for
exactly those.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def uv_plan(tmp_path: Path, conf: str = "", **env: str) -> str:
    config = tmp_path / "pip.conf"
    config.write_text(conf)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    environ.update(PIP_CONFIG_FILE=str(config), **env)
    done = subprocess.run(
        [str(ROOT / "install.sh"), "--uv-plan"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_indexes_hosts_binaries_and_constraints_become_uv_arguments(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    out = uv_plan(
        tmp_path,
        "[global]\n"
        "index-url = https://mirror.example/simple\n"
        "extra-index-url =\n    https://one.example/simple\n    https://two.example/simple\n"
        "trusted-host = mirror.example\n"
        f"constraint = {constraints}\n"
        "[install]\n"
        "no-binary = pyyaml\n",
    )
    command, _environment = out.splitlines()
    assert command.startswith("uv pip install "), out
    assert " --compile-bytecode --index-strategy unsafe-best-match " in command, out
    args = command.split(" ")
    for arg in (
        "--index-url=https://mirror.example/simple",
        "--extra-index-url=https://one.example/simple",
        "--extra-index-url=https://two.example/simple",
        "--allow-insecure-host=mirror.example",
        f"--constraints={constraints}",
        "--no-binary=pyyaml",
    ):
        assert arg in args, (arg, out)
    assert "--no-cache" not in args, out


def test_variables_count_as_pip_counts_them(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    out = uv_plan(
        tmp_path,
        PIP_FIND_LINKS=str(wheels),
        PIP_NO_CACHE_DIR="1",  # what Dockerfile.python sets
        PIP_CERT=str(ca),
        PIP_DEFAULT_TIMEOUT="180",
        PIP_PROXY="http://proxy.example:3128",
        PIP_PRE="1",
    )
    command, environment = out.splitlines()
    args = command.split(" ")
    for arg in (f"--find-links={wheels}", "--no-cache", "--prerelease=allow"):
        assert arg in args, (arg, out)
    values = dict(item.split("=", 1) for item in environment.split(" ")[1:])
    assert values["SSL_CERT_FILE"] == str(ca), out
    assert values["UV_HTTP_TIMEOUT"] == "180", out
    assert values["ALL_PROXY"] == "http://proxy.example:3128", out


def test_a_setting_uv_cannot_take_leaves_the_install_to_pip(tmp_path):
    out = uv_plan(tmp_path, "[global]\nkeyring-provider = subprocess\n")
    assert out.startswith("pip installs, not uv:"), out
    assert "keyring-provider" in out, out
    out = uv_plan(tmp_path, PIP_REQUIRE_HASHES="1")
    assert out.startswith("pip installs, not uv:") and "require-hashes" in out, out
