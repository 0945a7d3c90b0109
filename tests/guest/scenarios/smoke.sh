# The harness itself, without thin-ctl: the kernel has ublk and dm-thin-pool, io_uring works,
# and fio verifies data through a loop device over a virtio disk.
# guest-timeout: 120
# guest-disks: 64M
. /lib.sh

step "kernel features"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing after modprobe ublk_drv"
must grep -q "^dm_thin_pool " /proc/modules
dmsetup --noudevsync targets >/tmp/targets || fail "dmsetup targets exited $?"
grep -q '^thin-pool' /tmp/targets || fail "dm target thin-pool not registered"
grep -q '^thin ' /tmp/targets || fail "dm target thin not registered"

step "fio verify on loop over /dev/vda"
LOOP=$(losetup -f --show --direct-io=on /dev/vda) || fail "losetup exited $?"
must fio --name=smoke --filename="$LOOP" --direct=1 --ioengine=io_uring --rw=randwrite \
    --bs=4k --size=16M --iodepth=16 --verify=crc32c --do_verify=1 --randrepeat=1 \
    --output=/tmp/fio.out
cat /tmp/fio.out
grep -q 'err= 0' /tmp/fio.out || fail "fio reports errors"
must losetup -d "$LOOP"
pass "ublk-control present, dm thin targets registered, fio crc32c verify on loop passed"
