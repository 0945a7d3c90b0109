# Discards on a thin: blkdiscard of whole blocks unmaps them, `pool status` shows the data
# blocks freed, the range reads zeros and the rest is untouched; an unaligned write-zeroes
# (blkdiscard -z) reads zeros; a discard of blocks a snapshot shares reads zeros on the thin
# but frees nothing and leaves the snapshot's data. It all holds after a restart, and
# thin_check accepts the metadata.
# guest-timeout: 300
# guest-disks: 32M 256M
# guest-needs: thin-ctl
. /lib.sh

META=/dev/vda
DATA=/dev/vdb
MIB=1048576

step "pool, thin, 64 MiB of pattern A"
must tctl pool create p --metadata $META --data $DATA
must tctl pool start p
must tctl create p vol --size 128M
expose p vol
ref_pattern /tmp/A 0xa1 0 64M --bs=64k
fio_pattern "$DEV" 0xa1 0 64M --bs=64k --end_fsync=1
zeros /tmp/zero 128M
# Expected content of vol, updated as the scenario goes.
cp /tmp/A /tmp/expect
used0=$(jfield p data_blocks_used)
mapped0=$(jfield p mapped_blocks vol)
log "used $used0, vol maps $mapped0"
[ "$mapped0" -eq 1024 ] || fail "vol maps $mapped0 blocks after 64 MiB written, not 1024"

step "blkdiscard 16M+32M (512 whole blocks): blocks freed, range reads zeros"
must blkdiscard -o $((16 * MIB)) -l $((32 * MIB)) "$DEV"
freed() { [ "$(jfield p data_blocks_used)" -le $((used0 - 512)) ]; }
wait_until 20 freed || fail "data_blocks_used $(jfield p data_blocks_used) after discarding 512 of $used0 blocks"
used1=$(jfield p data_blocks_used)
mapped1=$(jfield p mapped_blocks vol)
log "used $used0 -> $used1, vol maps $mapped0 -> $mapped1"
[ "$mapped1" -eq 512 ] || fail "vol maps $mapped1 blocks after discarding 512 of 1024"
must_same "$DEV" /tmp/zero $((16 * MIB)) $((32 * MIB)) "discarded range"
dd if=/dev/zero of=/tmp/expect bs=1M seek=16 count=32 conv=notrunc 2>/dev/null
must_same "$DEV" /tmp/expect 0 $((64 * MIB)) "the rest of vol"
discarded=$(jfield p blocks_discarded)
[ "${discarded:-0}" -ge 512 ] || fail "stats.blocks_discarded is ${discarded:-?}, not >= 512"

step "unaligned write-zeroes (blkdiscard -z 4k+100k inside mapped blocks) reads zeros"
must blkdiscard -z -o $((4 * MIB + 4096)) -l $((100 * 1024)) "$DEV"
dd if=/dev/zero of=/tmp/expect bs=4096 seek=$((4 * 256 + 1)) count=25 conv=notrunc 2>/dev/null
must_same "$DEV" /tmp/expect 0 $((64 * MIB)) "vol after write-zeroes"

step "discard blocks a snapshot shares: zeros on vol, nothing freed, snapshot keeps its data"
must tctl snapshot p vol snap
cp /tmp/expect /tmp/snap.expect
used2=$(jfield p data_blocks_used)
must blkdiscard -o $((48 * MIB)) -l $((16 * MIB)) "$DEV"
dd if=/dev/zero of=/tmp/expect bs=1M seek=48 count=16 conv=notrunc 2>/dev/null
must_same "$DEV" /tmp/expect 0 $((64 * MIB)) "vol after discarding shared blocks"
sleep 1
used3=$(jfield p data_blocks_used)
[ "$used3" -ge "$used2" ] || fail "discarding shared blocks freed $((used2 - used3)) data blocks the snapshot still maps"
expose p snap
must_same "$DEV" /tmp/snap.expect 0 $((64 * MIB)) "snapshot after its origin's discard"

step "restart: the same bytes, thin_check clean"
must tctl pool stop p
must thin_check $META
tcheck $META
must tctl pool start p
expose p vol
must_same "$DEV" /tmp/expect 0 $((64 * MIB)) "vol after restart"
expose p snap
must_same "$DEV" /tmp/snap.expect 0 $((64 * MIB)) "snapshot after restart"
must tctl pool stop p
must thin_check $META
pass "discard of 512 blocks: used $used0 -> $used1, zeros read back; write-zeroes unaligned reads zeros; shared blocks kept for the snapshot; same after restart; thin_check clean"
