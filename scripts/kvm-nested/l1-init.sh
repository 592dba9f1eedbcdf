#!/bin/bash
# PID 1 of the L1 guest (exec'd by stub-init from the 9p share kvmin).
# Loads kvm_amd, imports the builder bundle into a store on tmpfs, runs
# checks (a)-(d) of scripts/test-kvm-nested and writes everything to the
# writable 9p share kvmout; `status` there has one line per step
# ("NAME VALUE"), ending with "done". Always powers off.
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TZ=UTC
console() { echo "kvm-nested: $*" >/dev/console; }
console "init started (uptime $(cut -d' ' -f1 /proc/uptime)s)"
off() {
  sync
  [ -n "${OUT:-}" ] && umount "$OUT" 2>/dev/null
  console "powering off"
  echo o >/proc/sysrq-trigger
  sleep 30
}
trap off EXIT

mount -t tmpfs -o mode=0755,size=6g tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
IN=/mnt/in OUT=/mnt/out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 kvmout "$OUT" || { console "FATAL cannot mount kvmout"; OUT=""; exit 1; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose kvmimg /mnt/img || console "cannot mount kvmimg"
st() { echo "$*" >>"$OUT/status"; console "status: $*"; }
st l1_uptime "$(cut -d' ' -f1 /proc/uptime)"
. "$IN/config"
. "$OUT/launch.conf"
ip link set lo up
hostname kvm-l1
{ uname -a; grep -m1 '^model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; nproc; grep MemTotal /proc/meminfo; cat /proc/cmdline; } >"$OUT/l1-info.txt" 2>&1

# KVM
# shellcheck disable=SC2086
if modprobe kvm_amd $KVM_AMD_OPTS 2>"$OUT/modprobe.log" && [ -c /dev/kvm ]; then
  st kvm_load ok
else
  st kvm_load "failed: $(tr '\n' ' ' <"$OUT/modprobe.log")"
fi
for p in nested npt; do echo "kvm_amd.$p=$(cat /sys/module/kvm_amd/parameters/$p 2>/dev/null)"; done >>"$OUT/l1-info.txt"

# Diagnostics while the checks run: the builders' serial consoles (L2) and
# L1's kernel log, copied out every 5 s.
(
  while :; do
    for d in /tmp/reprovm-run-*; do
      [ -f "$d/serial.log" ] && cp "$d/serial.log" "$OUT/l2-serial.${d#/tmp/reprovm-run-}.log" 2>/dev/null
    done
    dmesg >"$OUT/l1-dmesg.txt" 2>&1
    sleep 5
  done
) &

export XDG_CACHE_HOME=/tmp/cache TMPDIR=/tmp REPROVM_IMAGE="$PIN"
R="$IN/reprovm"
SRC="$IN/src/examples/hello"
secs() { awk -v a="$1" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.1f", b - a }'; }
now() { cut -d' ' -f1 /proc/uptime; }

t=$(now)
if "$R" image import /mnt/img/bundle.img --sha256 "${PIN#sha256:}" >"$OUT/import.log" 2>&1; then st import ok; else st import "failed rc=$?"; fi
st t_import "$(secs "$t")"

# build LABEL ACCEL-ARGS... : a build of examples/hello into $OUT/LABEL
build() {
  local label="$1"; shift
  mkdir -p "$OUT/$label"
  "$R" -v build "$SRC" --out "/tmp/out-$label" --boot-timeout "${BOOT_TIMEOUT:-600}" "$@" >"$OUT/$label/stdout.log" 2>"$OUT/$label/stderr.log"
  local rc=$?
  cp /tmp/out-"$label"/* "$OUT/$label/" 2>/dev/null
  return $rc
}
accel_of() { sed -n 's/.*"accelerator": *"\([a-z]*\)".*/\1/p' "$1" 2>/dev/null | head -n 1; }

if [ "${ONLY_FALLBACK:-0}" != 1 ]; then
# (a) --accel kvm
t=$(now)
console "check (a): reprovm build --accel kvm"
build kvm --accel kvm; rc=$?
st t_a "$(secs "$t")"
a="$(accel_of "$OUT/kvm/result.json")"
if [ $rc = 0 ] && [ "$a" = kvm ]; then st check_a ok; else st check_a "rc=$rc accelerator=${a:-none}"; fi

# (d) the CPU as the builder sees it under KVM
t=$(now)
console "check (d): CPU dump under KVM"
if "$IN/cpu-dump" "$R" --accel kvm --boot-timeout "${BOOT_TIMEOUT:-600}" -v >"$OUT/cpu-dump-kvm.txt" 2>"$OUT/cpu-dump-kvm.stderr"; then
  st check_d ok
else
  st check_d "rc=$?"
fi
st t_d "$(secs "$t")"

# (b) --accel auto chooses KVM
t=$(now)
console "check (b): reprovm build --accel auto"
build auto --accel auto; rc=$?
st t_b "$(secs "$t")"
a="$(accel_of "$OUT/auto/result.json")"
if [ $rc = 0 ] && [ "$a" = kvm ]; then st check_b ok; else st check_b "rc=$rc accelerator=${a:-none}"; fi

fi # ONLY_FALLBACK

# (e) optional: the CPU dump under KVM as before the vendor pin.
if [ "${CHECK_UNPINNED:-0}" = 1 ]; then
  t=$(now)
  console "check (e): CPU dump under KVM without the vendor pin"
  if "$IN/cpu-dump" "$R" --accel kvm --boot-timeout "${BOOT_TIMEOUT:-600}" -v --qemu "$IN/qemu-unpinned-vendor" >"$OUT/cpu-dump-kvm-unpinned.txt" 2>"$OUT/cpu-dump-kvm-unpinned.stderr"; then
    st check_e ok
  else
    st check_e "rc=$?"
  fi
  st t_e "$(secs "$t")"
fi

# (c) a CPU model this KVM refuses: auto falls back to TCG with a warning.
# FALLBACK_MODELS lists, in order, the 64-bit models TCG provides with
# `enforce` (computed on the host). QEMU under this KVM says which features
# each model lacks here (query-cpu-definitions); the first candidate lacking
# any feature other than those reprovm switches off anyway is taken, and
# QEMU's refusal of it with reprovm's -cpu settings is checked directly.
if [ "${CHECK_FALLBACK:-0}" = 1 ]; then
  t=$(now)
  printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-cpu-definitions"}' '{"execute":"quit"}' |
    timeout 300 qemu-system-x86_64 -machine none,accel=kvm -qmp stdio -display none -nodefaults >"$OUT/kvm-cpu-definitions.json" 2>&1
  tr -d '\n' <"$OUT/kvm-cpu-definitions.json" | sed 's/}, *{/}\n{/g' |
    sed -n 's/.*"name": *"\([^"]*\)".*"unavailable-features": *\[\([^]]*\)\].*/\1 \2/p' | tr -d '",' >"$OUT/kvm-unavailable.txt"
  model=""
  for m in $FALLBACK_MODELS; do
    lacks="$(awk -v m="$m" '$1 == m { $1 = ""; print }' "$OUT/kvm-unavailable.txt" | tr ' ' '\n' | grep -v -x -e '' -e vme -e x2apic -e pmu | tr '\n' ' ')"
    [ -n "$lacks" ] || continue
    timeout 120 qemu-system-x86_64 -machine pc-q35-7.2,accel=kvm -cpu "$m,enforce,level=31,vme=off,x2apic=off,pmu=off,kvm=off,tcg-cpuid=off,hypervisor=on" \
      -nodefaults -display none -S -m 64 >"$OUT/fallback-probe-$m.log" 2>&1 &
    pid=$!
    # Refused: QEMU exits at once. Accepted: it waits, stopped (-S).
    for _ in $(seq 60); do kill -0 $pid 2>/dev/null || break; sleep 1; done
    if kill -0 $pid 2>/dev/null; then kill $pid; wait $pid 2>/dev/null; else wait $pid; model="$m"; break; fi
  done
  if [ -z "$model" ]; then
    st check_c "no candidate model is refused by this KVM (see kvm-unavailable.txt)"
  else
    st fallback_model "$model, lacking under this KVM: $lacks"
    console "check (c): reprovm build --accel auto --cpu-model $model"
    build fallback --accel auto --cpu-model "$model"; rc=$?
    a="$(accel_of "$OUT/fallback/result.json")"
    if [ $rc = 0 ] && [ "$a" = tcg ] && grep -q 'falling back to TCG' "$OUT/fallback/stderr.log"; then
      st check_c ok
    else
      st check_c "rc=$rc accelerator=${a:-none} warning=$(grep -c 'falling back to TCG' "$OUT/fallback/stderr.log")"
    fi
  fi
  st t_c "$(secs "$t")"
fi

dmesg >"$OUT/l1-dmesg.txt" 2>&1
st done "$(cut -d' ' -f1 /proc/uptime)"
