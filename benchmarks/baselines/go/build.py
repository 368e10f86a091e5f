"""Build the Go baseline from Debian's packages, with no module download.

Debian ships Go (``golang-go``) and fasthttp with its dependencies as source under ``/usr/share/gocode``
(``golang-github-valyala-fasthttp-dev``), so the build runs in GOPATH mode against that tree. Fiber is not
packaged, so the port uses fasthttp directly (Fiber's engine). Binaries are cached under ``build/go-baseline``,
keyed by a hash of the sources and the Go version.

    python -m benchmarks.baselines.go.build [--install] [--test]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
REPO_ROOT = SOURCE_DIR.parents[2]
BUILD_DIR = REPO_ROOT / "build" / "go-baseline"
DEBIAN_GOPATH = Path("/usr/share/gocode")
FASTHTTP_SOURCE = DEBIAN_GOPATH / "src" / "github.com" / "valyala" / "fasthttp"
#: What ``apt-get install`` needs to build the port.
APT_PACKAGES = ("golang-go", "golang-github-valyala-fasthttp-dev")
BUILD_TIMEOUT_S = 300


class GoBuildError(RuntimeError):
    """The toolchain is missing and cannot be installed, or the build or tests failed."""


def missing_packages() -> list[str]:
    """The Debian packages from :data:`APT_PACKAGES` that are not installed."""
    missing = []
    if shutil.which("go") is None:
        missing.append("golang-go")
    if not FASTHTTP_SOURCE.is_dir():
        missing.append("golang-github-valyala-fasthttp-dev")
    return missing


def install_toolchain() -> None:
    """``apt-get install`` whatever is missing (as root, or through passwordless sudo).

    ``apt-get update`` runs first only when apt knows no candidate for a package, as on a fresh image.

    Raises:
        GoBuildError: If packages are missing and cannot be installed.
    """
    missing = missing_packages()
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise GoBuildError(f"missing {' '.join(missing)} and no apt-get; install Go and fasthttp by hand")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if prefix and shutil.which("sudo") is None:
        raise GoBuildError(f"missing {' '.join(missing)}; run: sudo apt-get install -y {' '.join(missing)}")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    policy = subprocess.run(["apt-cache", "policy", *missing], capture_output=True, text=True, check=False)
    if "Candidate: (none)" in policy.stdout or policy.stdout.count("Candidate:") < len(missing):
        _run([*prefix, "apt-get", "update"], env=env)
    _run([*prefix, "apt-get", "install", "-y", "--no-install-recommends", *missing], env=env)
    still = missing_packages()
    if still:
        raise GoBuildError(f"apt-get install did not provide {' '.join(still)}")


def go_env() -> dict[str, str]:
    """Environment for a GOPATH-mode build against Debian's sources, with no network and a private cache."""
    return os.environ | {
        "GO111MODULE": "off",
        "GOPATH": str(DEBIAN_GOPATH),
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GOCACHE": str(BUILD_DIR / "cache"),
        "CGO_ENABLED": "0",
    }


def sources() -> list[Path]:
    """The Go files of the service, tests excluded."""
    return sorted(p for p in SOURCE_DIR.glob("*.go") if not p.name.endswith("_test.go"))


def go_version() -> str:
    """``go version`` output, e.g. ``go version go1.19.8 linux/amd64``."""
    return _run(["go", "version"], env=go_env()).strip()


def build(*, install: bool = False) -> Path:
    """Return the path of a built ``mab-go`` binary for the current sources, building it if needed.

    Args:
        install: Install missing Debian packages first (see :func:`install_toolchain`).

    Raises:
        GoBuildError: If the toolchain is missing or the build fails.
    """
    if install:
        install_toolchain()
    elif missing := missing_packages():
        raise GoBuildError(f"missing {' '.join(missing)}")
    digest = hashlib.sha256(go_version().encode())
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    binary = BUILD_DIR / f"mab-go-{digest.hexdigest()[:12]}"
    if binary.is_file():
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    _run(["go", "build", "-trimpath", "-o", str(partial), "."], cwd=SOURCE_DIR, env=go_env())
    partial.replace(binary)  # atomic: a concurrent build of the same sources writes the same file
    return binary


def test() -> str:
    """Run ``gofmt -l``, ``go vet`` and ``go test`` on the sources; return the test output.

    Raises:
        GoBuildError: If a file is not gofmt-formatted, vet complains, or a test fails.
    """
    unformatted = _run(["gofmt", "-l", "."], cwd=SOURCE_DIR, env=go_env()).strip()
    if unformatted:
        raise GoBuildError(f"not gofmt-formatted: {unformatted}")
    _run(["go", "vet", "."], cwd=SOURCE_DIR, env=go_env())
    return _run(["go", "test", "-count=1", "."], cwd=SOURCE_DIR, env=go_env())


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GoBuildError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise GoBuildError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def main(argv: Sequence[str] | None = None) -> int:
    prog = "python -m benchmarks.baselines.go.build"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="apt-get install missing Debian packages first")
    parser.add_argument("--test", action="store_true", help="also run gofmt -l, go vet and go test")
    args = parser.parse_args(argv)
    try:
        binary = build(install=args.install)
        if args.test:
            print(test(), end="")
    except GoBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
