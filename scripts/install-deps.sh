#!/usr/bin/env bash
# Installs the Debian 12 packages vmlink's lab and tests need, as root (or
# through sudo). Idempotent: installs only what is missing.
#
#   qemu-system-x86 qemu-system-data  the lab's QEMU (qboot.rom is in -data)
#   busybox-static cpio xz-utils file kmod  the lab's initramfs and kernel unpacking
#   linux-image-amd64 tiny-initramfs  the guest kernel (tiny-initramfs instead of
#                                     initramfs-tools avoids a udev/systemd upgrade)
#   socat                             the peer the relay is tested and measured against
#   tshark                            reads vmlink-vhost's packet captures back in its tests
#   iproute2                          `ip link add type vsockmon` for vmlink capture (tested in a guest)
#   systemd                           systemd-analyze verify reads packaging/vmlink-agent.service
#                                     (host_packaging.rs; systemd need not be running)
#   libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libxml2-utils
#                                     libvirt drives a lab guest through the channels of
#                                     docs/guest-setup.md and vmlink-agent --qga (guest_libvirt.rs),
#                                     with its embedded QEMU driver: no daemon, no systemd;
#                                     virt-xml-validate (xmllint) checks the guide's XML.
#                                     That driver needs the user `libvirt-qemu` to exist, as
#                                     Debian's libvirt-daemon-system creates it; made here if missing.
set -euo pipefail

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

pkgs=()
for p in qemu-system-x86 qemu-system-data busybox-static cpio xz-utils file kmod socat qemu-guest-agent tshark iproute2 systemd \
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libxml2-utils; do
    is_installed "$p" || pkgs+=("$p")
done
if ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
    pkgs+=(linux-image-amd64)
    if ! is_installed initramfs-tools && ! is_installed dracut && ! is_installed tiny-initramfs; then
        pkgs+=(tiny-initramfs)
    fi
fi
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)

add_libvirt_user() {
    getent group libvirt-qemu >/dev/null || "${sudo[@]}" groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null || "${sudo[@]}" useradd --system --gid libvirt-qemu \
        --home-dir /var/lib/libvirt --no-create-home --shell /usr/sbin/nologin libvirt-qemu
}

if [ ${#pkgs[@]} -eq 0 ]; then
    add_libvirt_user
    echo "install-deps: everything is installed"
    exit 0
fi
echo "install-deps: installing ${pkgs[*]}" >&2
"${sudo[@]}" apt-get update -qq
extra=()
# bookworm-backports' qemu-utils (10.x) declares Breaks: qemu-system-common (<< 8.0);
# pin it to qemu-system-x86's version so apt does not remove it.
if [[ " ${pkgs[*]} " == *" qemu-system-x86 "* ]] && is_installed qemu-utils; then
    want=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
    have=$(dpkg-query -W -f='${Version}' qemu-utils)
    if [ -n "$want" ] && [ "$want" != "$have" ] \
        && apt-cache madison qemu-utils | awk '{ print $3 }' | grep -qxF -- "$want"; then
        extra+=("qemu-utils=$want" --allow-downgrades)
    fi
fi
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${pkgs[@]}" "${extra[@]}"
add_libvirt_user
