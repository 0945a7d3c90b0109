# The kernel's dm-thin-pool and ublk-thin read each other's pools.
#
# Ours to the kernel: thin-ctl makes a pool with a thin (pattern A, a discarded range) and a
# snapshot of it (pattern B over part of it), stops it; thin_check accepts the metadata; the
# kernel activates it (dmsetup, major:minor tables, /dev/dm-N) and reads the same bytes
# from both thins; after the kernel let go, thin_check still accepts it.
# The kernel's to ours: dm-thin makes a pool, a thin (pattern C) and a snapshot of it
# (pattern D over part of it); after `dmsetup remove`, `thin-ctl pool import` adopts it,
# `resize` gives the thins their sizes, `expose` serves them with the same bytes; writes
# through thin-ctl land, and thin_check accepts the result.
# guest-timeout: 300
# guest-disks: 16M 128M 16M 128M
# guest-needs: thin-ctl
. /lib.sh

MIB=1048576
BLOCK_SECTORS=128 # 64 KiB
THIN_SECTORS=$((64 * MIB / 512))

# /dev/dm-N of a device-mapper device by name.
dm_dev() {
    for _d in /sys/block/dm-*; do
        [ "$(cat "$_d/dm/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${_d##*/}"; return 0; }
    done
    return 1
}
dms() {
    log "+ dmsetup $*"
    dmsetup --noudevsync "$@" || fail "$STEP: dmsetup $* exited $?"
}
# Activates a kernel thin-pool; DM is its /dev/dm-N: kpool NAME META DATA DATA_BLOCKS.
kpool() {
    dms create "$1" --table "0 $(($4 * BLOCK_SECTORS)) thin-pool $(mm "$2") $(mm "$3") $BLOCK_SECTORS 0"
    DM=$(dm_dev "$1") || fail "$STEP: no /dev/dm-N for $1"
}
# Activates a kernel thin; DM is its /dev/dm-N: kthin NAME POOL_DEV ID.
kthin() {
    dms create "$1" --table "0 $THIN_SECTORS thin $(mm "$2") $3"
    DM=$(dm_dev "$1") || fail "$STEP: no /dev/dm-N for $1"
}

step "reference patterns"
ref_pattern /tmp/A 0xa1 0 24M
ref_pattern /tmp/C 0xc3 0 24M
zeros /tmp/zero 64M
cp /tmp/A /tmp/t.expect
dd if=/dev/zero of=/tmp/t.expect bs=1M seek=20 count=4 conv=notrunc 2>/dev/null
cp /tmp/A /tmp/s.expect
ref_pattern /tmp/s.expect 0xb2 8M 8M
cp /tmp/C /tmp/k0.expect
cp /tmp/C /tmp/k1.expect
ref_pattern /tmp/k1.expect 0xd4 4M 8M
# The thins are 64 MiB; what was never written reads zeros.
for f in /tmp/*.expect; do truncate -s 64M "$f"; done

step "ours: thin-ctl pool with thin t (A, 20M-24M discarded) and snapshot s (B at 8M-16M)"
must tctl pool create p --metadata /dev/vda --data /dev/vdb
must tctl pool start p
must tctl create p t --size 64M
expose p t
fio_pattern "$DEV" 0xa1 0 24M --end_fsync=1
must tctl snapshot p t s
must blkdiscard -o $((20 * MIB)) -l $((4 * MIB)) "$DEV"
expose p s
fio_pattern "$DEV" 0xb2 8M 8M --end_fsync=1
T_ID=$(jfield p id t)
S_ID=$(jfield p id s)
NR=$(jfield p data_blocks_total)
log "thin ids: t=$T_ID s=$S_ID, $NR data blocks"
must tctl pool stop p
must thin_check /dev/vda

step "ours: the kernel's dm-thin reads the same bytes"
kpool upool /dev/vda /dev/vdb "$NR"
P=$DM
kthin ut "$P" "$T_ID"
T=$DM
kthin us "$P" "$S_ID"
S=$DM
dms status upool
must_same "$T" /tmp/t.expect 0 $((64 * MIB)) "thin t through the kernel"
must_same "$S" /tmp/s.expect 0 $((64 * MIB)) "snapshot s through the kernel"
dms remove us
dms remove ut
dms remove upool
must thin_check /dev/vda

step "theirs: dm-thin pool, thin 0 (C), snapshot 1 (D at 4M-12M)"
NRK=$((128 * MIB / 65536))
kpool kpool /dev/vdc /dev/vdd $NRK
KP=$DM
dms message kpool 0 "create_thin 0"
kthin kthin0 "$KP" 0
K0=$DM
fio_pattern "$K0" 0xc3 0 24M --end_fsync=1
dms suspend kthin0
dms message kpool 0 "create_snap 1 0"
dms resume kthin0
kthin kthin1 "$KP" 1
K1=$DM
fio_pattern "$K1" 0xd4 4M 8M --end_fsync=1
must_same "$K0" /tmp/k0.expect 0 $((64 * MIB)) "kernel thin 0 before removal"
must_same "$K1" /tmp/k1.expect 0 $((64 * MIB)) "kernel snapshot 1 before removal"
dms remove kthin1
dms remove kthin0
dms remove kpool
must thin_check /dev/vdc

step "theirs: thin-ctl imports it, resizes, exposes: the same bytes"
must tctl pool import k --metadata /dev/vdc --data /dev/vdd
must tctl resize k thin0 --size 64M
must tctl resize k thin1 --size 64M
must tctl pool start k
expose k thin0
KT0=$DEV
expose k thin1
KT1=$DEV
must_same "$KT0" /tmp/k0.expect 0 $((64 * MIB)) "kernel thin 0 through thin-ctl"
must_same "$KT1" /tmp/k1.expect 0 $((64 * MIB)) "kernel snapshot 1 through thin-ctl"

step "theirs: writes through thin-ctl; thin_check; the kernel reads them"
ref_pattern /tmp/k0.expect 0xe5 20M 8M
fio_pattern "$KT0" 0xe5 20M 8M --end_fsync=1
must_same "$KT0" /tmp/k0.expect 0 $((64 * MIB)) "thin 0 after our writes"
must_same "$KT1" /tmp/k1.expect 0 $((64 * MIB)) "snapshot 1 unchanged by writes to its origin"
must tctl pool stop k
must thin_check /dev/vdc
tcheck /dev/vdc
kpool kpool2 /dev/vdc /dev/vdd $NRK
kthin kthin0b "$DM" 0
K0=$DM
must_same "$K0" /tmp/k0.expect 0 $((64 * MIB)) "kernel reads thin-ctl's writes to its pool"
dms remove kthin0b
dms remove kpool2
must thin_check /dev/vdc
pass "kernel dm-thin reads thin-ctl's thin and snapshot byte for byte; thin-ctl imports, serves and writes the kernel's pool, which the kernel reads back; thin_check clean throughout"
