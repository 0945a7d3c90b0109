# The README's main job (tools/demo runs this scenario where the host has no ublk): a pool,
# a thin and a snapshot of it, both served as ublk devices, a short fio crc32c verify on
# each, and the pool's status. Its console output from "--- fio vol" on is what tools/demo
# shows.
# guest-timeout: 300
# guest-disks: 16M 512M
# guest-needs: thin-ctl
. /lib.sh

step "create a pool, a thin and a snapshot"
must tctl pool create demo --metadata /dev/vda --data /dev/vdb
must tctl create demo vol --size 256M
must tctl pool start demo
expose demo vol
VOL=$DEV
step "fio verify on the thin"
must fio --name=vol --filename="$VOL" $FIO_DIRECT --rw=randwrite --bs=4k --size=64M \
    --iodepth=16 --eta=never --verify=crc32c --do_verify=1 --output=/tmp/vol.out
must tctl snapshot demo vol snap
expose demo snap
SNAP=$DEV
step "fio verify on the snapshot: it reads what the thin held"
must fio --name=vol --filename="$SNAP" $FIO_DIRECT --rw=randwrite --bs=4k --size=64M \
    --iodepth=16 --eta=never --verify=crc32c --verify_only --output=/tmp/snap.out
step "fio verify writing to the snapshot (breaks sharing)"
must fio --name=snapw --filename="$SNAP" $FIO_DIRECT --rw=randrw --bs=4k --size=64M \
    --iodepth=16 --eta=never --verify=crc32c --do_verify=1 --output=/tmp/snapw.out
for f in vol snap snapw; do
    echo "--- fio $f"
    grep -E "err=|IOPS=" /tmp/$f.out
done
echo "--- thin-ctl pool status demo"
must tctl pool status demo
must tctl pool stop demo
must thin_check /dev/vda
pass "pool, thin and snapshot served as ublk devices; fio crc32c verify passed on both"
