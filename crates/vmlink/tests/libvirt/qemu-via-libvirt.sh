#!/usr/bin/env bash
# Runs a lab guest under libvirt. vmlink-lab calls this in place of
# qemu-system-x86_64 (LabConfig::qemu) with QEMU's arguments; the test
# `guest_libvirt.rs` passes the libvirt root first:
#
#   qemu-via-libvirt.sh ROOT QEMU-ARGS...
#
# It writes a libvirt domain (ROOT/domain.xml) in which
#   * memory, vCPUs, the accelerator, kernel, initrd and command line, the
#     firmware and the reboot policy are libvirt's own elements;
#   * the lab's serial ports (`-chardev socket,...` + `-device virtserialport`)
#     are left out: the test writes ROOT/channels.xml, the <channel> elements of
#     docs/guest-setup.md as a user pastes them, and libvirt creates those ports
#     and their sockets (without that file, each lab port becomes such an
#     element with the lab's socket path);
#   * everything else (the lab's 9p root, its stdout/stderr/status ports, the
#     CPU model) is passed through <qemu:commandline>, its PCI devices in slots
#     0x18 and up;
# starts it with libvirt's embedded QEMU driver (qemu:///embed?root=ROOT, no
# daemon), and stays until QEMU exits, as the lab expects of QEMU. The test
# then drives the running domain with further `virsh -c qemu:///embed?root=ROOT`
# commands, and destroys it at the end.
#
# QEMU is libvirt's daemon child, not ours, so two things keep it from
# outliving the guest or the lab: it runs with `-action shutdown=poweroff` (no
# libvirt driver stays loaded to stop a guest that shut down or rebooted), and
# a watcher kills it once this script is gone (the lab SIGKILLs its "QEMU" on
# a timeout).
set -euo pipefail
# bash 5.2 would read `&` in a replacement as the matched text (esc below).
shopt -u patsub_replacement 2>/dev/null || true

root=$1
shift
uri="qemu:///embed?root=$root"
name=vmlab

esc() {
    local s=$1
    s=${s//&/&amp;}
    s=${s//</&lt;}
    s=${s//>/&gt;}
    s=${s//\'/&apos;}
    s=${s//\"/&quot;}
    printf '%s' "$s"
}

type=qemu mem= cpus= kernel= initrd= cmdline= bios=
passthrough=()
declare -A socket_path=()
generated=
slot=0x18
args=("$@")
i=0
while ((i < ${#args[@]})); do
    a=${args[i]}
    next=${args[i + 1]:-}
    case $a in
    -nodefaults | -no-user-config) ;; # libvirt adds these itself
    # libvirt starts QEMU with -no-shutdown and turns a reboot into a shutdown;
    # with no driver loaded to act on it, QEMU must end by itself.
    -no-reboot) passthrough+=(-action shutdown=poweroff) ;;
    -display) i=$((i + 1)) ;;
    -machine)
        [[ $next == pc ]] || { echo "qemu-via-libvirt: machine $next is not handled" >&2; exit 2; }
        i=$((i + 1))
        ;;
    -m)
        mem=${next%M}
        i=$((i + 1))
        ;;
    -smp) cpus=$next i=$((i + 1)) ;;
    -accel)
        [[ $next == kvm ]] && type=kvm
        i=$((i + 1))
        ;;
    -bios) bios=$next i=$((i + 1)) ;;
    -kernel) kernel=$next i=$((i + 1)) ;;
    -initrd) initrd=$next i=$((i + 1)) ;;
    -append) cmdline=$next i=$((i + 1)) ;;
    -object | -numa)
        echo "qemu-via-libvirt: $a $next is not handled (vhost-user needs <memoryBacking>)" >&2
        exit 2
        ;;
    -chardev)
        if [[ $next =~ ^socket,id=(vmlab_ser[0-9]+),path=(.*),server=on,wait=off$ ]]; then
            # The lab doubles commas in paths (QEMU's option syntax).
            socket_path[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]//,,/,}
        else
            passthrough+=("$a" "$next")
        fi
        i=$((i + 1))
        ;;
    -device)
        if [[ $next =~ ^virtserialport,bus=vmlab_vs\.0,chardev=(vmlab_ser[0-9]+),name=(.*)$ ]]; then
            path=${socket_path[${BASH_REMATCH[1]}]:?}
            generated+="    <channel type='unix'>
      <source mode='bind' path='$(esc "$path")'/>
      <target type='virtio' name='$(esc "${BASH_REMATCH[2]}")'/>
    </channel>
"
        elif [[ $next =~ ^[a-z0-9-]+-pci, && $next != *,addr=* ]]; then
            # libvirt gives its own devices fixed slots from 2 up; keep the lab's clear of them.
            passthrough+=("$a" "$next,bus=pci.0,addr=$(printf '0x%x' "$slot")")
            slot=$((slot + 1))
        else
            passthrough+=("$a" "$next")
        fi
        i=$((i + 1))
        ;;
    *) passthrough+=("$a") ;;
    esac
    i=$((i + 1))
done

for v in mem cpus kernel initrd bios cmdline; do
    [[ -n ${!v} ]] || { echo "qemu-via-libvirt: no $v in the lab's arguments" >&2; exit 2; }
done
((slot <= 0x1f)) || { echo "qemu-via-libvirt: more PCI devices than slots 0x18-0x1f" >&2; exit 2; }
if [[ -e $root/channels.xml ]]; then
    channels=$(<"$root/channels.xml")$'\n'
else
    channels=$generated
fi

{
    echo "<domain type='$type' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
    echo "  <name>$name</name>"
    echo "  <memory unit='MiB'>$mem</memory>"
    echo "  <vcpu>$cpus</vcpu>"
    echo "  <os>"
    echo "    <type arch='x86_64' machine='pc'>hvm</type>"
    echo "    <loader type='rom'>$(esc "$bios")</loader>"
    echo "    <kernel>$(esc "$kernel")</kernel>"
    echo "    <initrd>$(esc "$initrd")</initrd>"
    echo "    <cmdline>$(esc "$cmdline")</cmdline>"
    echo "  </os>"
    echo "  <features><acpi/></features>"
    echo "  <on_poweroff>destroy</on_poweroff>"
    echo "  <on_reboot>destroy</on_reboot>"
    echo "  <on_crash>destroy</on_crash>"
    echo "  <devices>"
    echo "    <controller type='usb' model='none'/>"
    echo "    <memballoon model='none'/>"
    printf '%s' "$channels"
    echo "  </devices>"
    echo "  <qemu:commandline>"
    for a in "${passthrough[@]}"; do
        echo "    <qemu:arg value='$(esc "$a")'/>"
    done
    echo "  </qemu:commandline>"
    echo "</domain>"
} >"$root/domain.xml"

# One virsh at a time loads the embedded driver: the test's wait on the same lock.
LIBVIRT_LOG_OUTPUTS=3:file:$root/libvirt.log flock -w 120 "$root/virsh.lock" \
    virsh -q -c "$uri" create "$root/domain.xml" >&2
pid=$(<"$root/run/qemu/$name.pid")
# The watcher holds the read end of a pipe whose only writer is this script:
# when the script ends, however it ends, the read returns and QEMU is killed.
exec {gone}> >(read -r _ || true; kill -9 "$pid" 2>/dev/null)
# Stay while QEMU runs. It is not our child (no wait), so poll; a QEMU that has
# exited but is not reaped yet (a zombie) counts as gone.
running() {
    local state=
    [[ -r /proc/$pid/stat ]] && read -r _ _ state _ <"/proc/$pid/stat" 2>/dev/null
    [[ -n $state && $state != Z ]]
}
while running; do
    sleep 0.2
done
