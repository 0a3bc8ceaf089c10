#!/usr/bin/env bash
# Install what the kernel tier (make test-kernels) needs, idempotently (run as root):
#   Debian packages   qemu-system-x86 (TCG), busybox-static (virtme-ng's initramfs),
#                     debootstrap (the Debian 13 userland root), file (vng reads the kernel
#                     version with it), make, gcc-12 and dwarves (pahole: kbuild runs it on
#                     the seedsim module for 6.12)
#   virtme-ng         pinned, in its own venv under the kernel cache (not the project .venv)
# The project .venv (make setup-test) is used inside the host-userland guests as it is;
# the userland roots are made and set up by the tier itself (tests/vm/userland.py).
set -euo pipefail
cd "$(dirname "$0")/../.."

VNG_VERSION=1.42
CACHE=${KVMTRACE_KERNEL_CACHE:-/var/cache/kvmtrace-kernels}
say() { echo "setup-vm: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "ERROR: the kernel tier installs Debian packages and boots VMs: run as root" >&2
    exit 1
fi

pkgs=(qemu-system-x86 busybox-static debootstrap file make gcc-12 dwarves kmod python3-venv)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv="$CACHE/vng-venv"
if ! "$venv/bin/vng" --version 2>/dev/null | grep -q "$VNG_VERSION"; then
    say "installing virtme-ng $VNG_VERSION into $venv"
    rm -rf "$venv"
    mkdir -p "$CACHE"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "virtme-ng==$VNG_VERSION"
fi

# The kernels are resolved and fetched by the tier itself, each just before its guest, so
# the first guests boot while the others download (tests/vm/kernels.py fetch does it by
# hand).
