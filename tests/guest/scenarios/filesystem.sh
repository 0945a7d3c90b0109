# ext4 on a thin: mkfs (which discards the whole device first), files written and synced,
# umount, e2fsck -fn clean, remount, every checksum equal. Then a snapshot taken with the
# filesystem frozen: it is clean for e2fsck, mounts, holds exactly the files of that moment
# while the origin moves on, takes writes of its own that survive a remount, and the origin
# is unaffected by them. The pool restarts and both filesystems check clean again.
# guest-timeout: 360
# guest-disks: 32M 512M
# guest-needs: thin-ctl
. /lib.sh

META=/dev/vda
DATA=/dev/vdb
mkdir -p /mnt/a /mnt/b

# Checksums of every file under a directory, by relative path: sums DIR > FILE.
sums() { (cd "$1" && find . -type f | sort | xargs sha256sum); }
# Fails unless DIR holds exactly the files and contents of a sums file: same_sums DIR FILE.
same_sums() {
    sums "$1" >/tmp/now.sums
    cmp -s /tmp/now.sums "$2" || {
        diff "$2" /tmp/now.sums | head -n 10
        fail "$STEP: files under $1 differ from $2"
    }
    log "  $(wc -l <"$2") files match $2"
}
# A file of N KiB of random bytes: rnd FILE KIB.
rnd() { head -c $(($2 * 1024)) /dev/urandom >"$1" || fail "$STEP: writing $1"; }
fsck_clean() {
    log "+ e2fsck -fn $1"
    e2fsck -fn "$1" >/tmp/fsck.out 2>&1
    _rc=$?
    cat /tmp/fsck.out
    [ $_rc -eq 0 ] || fail "$STEP: e2fsck -fn $1 exited $_rc (not clean)"
}

step "pool, 256 MiB thin, mkfs.ext4"
must tctl pool create p --metadata $META --data $DATA
must tctl pool start p
must tctl create p fs --size 256M
expose p fs
FS=$DEV
must mkfs.ext4 -q -F "$FS"
used0=$(jfield p data_blocks_used)

step "write files, sync, umount, fsck, remount, compare"
must mount -t ext4 "$FS" /mnt/a
mkdir -p /mnt/a/d1/d2 /mnt/a/d3
i=0
while [ $i -lt 24 ]; do
    rnd /mnt/a/d$((i % 2 * 2 + 1))/f$i $((i * 97 + 3))
    i=$((i + 1))
done
rnd /mnt/a/d1/d2/big 24576
echo "small text" >/mnt/a/small
sums /mnt/a >/tmp/s1.sums
must sync
must umount /mnt/a
fsck_clean "$FS"
must mount -t ext4 "$FS" /mnt/a
same_sums /mnt/a /tmp/s1.sums
used1=$(jfield p data_blocks_used)
log "data blocks used: $used0 after mkfs, $used1 with files"
[ "$used1" -gt $((used0 + 400)) ] || fail "only $((used1 - used0)) blocks provisioned for ~50 MiB of files"

step "freeze, snapshot, thaw; the origin moves on"
must fsfreeze --freeze /mnt/a
must tctl snapshot p fs fsnap
must fsfreeze --unfreeze /mnt/a
must rm /mnt/a/d1/f0 /mnt/a/d3/f3
rnd /mnt/a/d3/after 2048
rnd /mnt/a/d1/d2/big 8192
sums /mnt/a >/tmp/s2.sums
must sync
must umount /mnt/a
fsck_clean "$FS"
must mount -t ext4 "$FS" /mnt/a
same_sums /mnt/a /tmp/s2.sums

step "the snapshot: clean, exactly the files at the freeze"
expose p fsnap
SNAP=$DEV
fsck_clean "$SNAP"
must mount -t ext4 "$SNAP" /mnt/b
same_sums /mnt/b /tmp/s1.sums

step "the snapshot takes writes of its own; they survive a remount; the origin does not see them"
rnd /mnt/b/d3/snap-only 4096
must rm /mnt/b/d1/f6
echo "appended" >>/mnt/b/small
sums /mnt/b >/tmp/s3.sums
must sync
must umount /mnt/b
fsck_clean "$SNAP"
must mount -t ext4 "$SNAP" /mnt/b
same_sums /mnt/b /tmp/s3.sums
same_sums /mnt/a /tmp/s2.sums
must umount /mnt/a
must umount /mnt/b

step "restart the pool: both clean, both the same"
must tctl pool stop p
must thin_check $META
must tctl pool start p
expose p fs
FS=$DEV
expose p fsnap
SNAP=$DEV
fsck_clean "$FS"
fsck_clean "$SNAP"
must mount -t ext4 -o ro "$FS" /mnt/a
must mount -t ext4 -o ro "$SNAP" /mnt/b
same_sums /mnt/a /tmp/s2.sums
same_sums /mnt/b /tmp/s3.sums
must umount /mnt/a
must umount /mnt/b
must tctl pool stop p
must thin_check $META
pass "ext4: fsck clean and checksums equal after remount and restart, on the thin and on a snapshot taken frozen ($(wc -l </tmp/s1.sums) files, $((used1 - used0)) blocks)"
