# A snapshot taken while fio writes the origin is a point in time.
#
# The origin holds pattern A over 32 MiB; fio rewrites it sequentially with pattern B (4 KiB
# writes, iodepth 16, rate-limited so it runs for seconds), and the snapshot is taken in the
# middle. Afterwards the origin reads exactly B, and the snapshot reads B up to some block,
# then at most 16 blocks (the writes in flight at that instant) each either A or B, then
# exactly A. A snapshot of the snapshot starts equal to it; writing C into the first half of
# one and D into the second half of the other changes only that one, and the origin stays
# B. Everything reads the same after the pool restarts, and thin_check accepts it.
# Patterns hold each block's offset (fio verify_pattern %o), so a misplaced block shows.
# guest-timeout: 360
# guest-disks: 32M 256M
# guest-needs: thin-ctl
. /lib.sh

META=/dev/vda
DATA=/dev/vdb
LEN=32M
LEN_BYTES=$((32 << 20))
HALF=16M
HALF_BYTES=$((16 << 20))
NR_BLOCKS=$((LEN_BYTES / 4096))
QD=16

step "reference patterns A, B, C, D in /tmp"
ref_pattern /tmp/A 0xa1 0 $LEN
ref_pattern /tmp/B 0xb2 0 $LEN
ref_pattern /tmp/C 0xc3 0 $HALF
ref_pattern /tmp/D 0xd4 $HALF $HALF

step "pool, origin thin with pattern A"
must tctl pool create p --metadata $META --data $DATA
must tctl pool start p
must tctl create p origin --size 64M
expose p origin --depth 64
ORIGIN=$DEV
fio_pattern "$ORIGIN" 0xa1 0 $LEN --end_fsync=1
must_same "$ORIGIN" /tmp/A 0 $LEN_BYTES "origin after writing A"

step "fio writes B over the origin; snapshot in the middle"
writes0=$(jfield p writes)
log "+ fio B in the background (rate 1000 IOPS, QD$QD)"
fio --name=B --filename="$ORIGIN" $FIO_DIRECT --iodepth=$QD --rw=write --bs=4k --size=$LEN \
    --verify=pattern --verify_pattern=0xb2%o --do_verify=0 --rate_iops=1000 \
    --output=/tmp/B.out &
FIO_PID=$!
# A quarter of B's writes done, as the pool counts them.
has_progress() { [ "$(jfield p writes)" -ge $((writes0 + NR_BLOCKS / 4)) ]; }
wait_until 120 has_progress || fail "fio B made no progress in 120 s"
t0=$(now)
must tctl snapshot p origin snap1
t1=$(now)
kill -0 $FIO_PID 2>/dev/null || fail "fio B had finished before the snapshot was taken"
log "snapshot took $(awk "BEGIN{print $t1-$t0}")s while fio B ran"
wait $FIO_PID
rc=$?
cat /tmp/B.out | grep -E 'IOPS|err='
[ $rc -eq 0 ] || fail "fio B exited $rc"

step "origin reads exactly B"
must_same "$ORIGIN" /tmp/B 0 $LEN_BYTES "origin after B"

step "snapshot: B, then at most $QD blocks A-or-B, then A"
expose p snap1 --depth 64
SNAP1=$DEV
log "+ blockcmp $SNAP1 B A (runs: ref first count; 1=B 2=A 0=neither)"
blockcmp --len $LEN "$SNAP1" /tmp/B /tmp/A >/tmp/runs
bc_rc=$?
head -n 40 /tmp/runs
[ $bc_rc -eq 0 ] || fail "snapshot holds blocks that are neither A nor B (blockcmp exit $bc_rc)"
# First block that is not B, and the last block that is B.
first_a=$(awk '$1 != 1 { print $2; exit }' /tmp/runs)
last_b=$(awk '$1 == 1 { last = $2 + $3 - 1 } END { print last + 0 }' /tmp/runs)
[ -n "$first_a" ] || fail "snapshot reads all B: it was not taken while B was being written"
[ "$first_a" -gt 0 ] || fail "snapshot reads no B at block 0: fio's first writes are missing"
[ "$last_b" -lt $((first_a + QD)) ] || \
    fail "snapshot is not a point in time: B at block $last_b, A from block $first_a (>$QD apart)"
log "snapshot: B in blocks 0-$((first_a - 1)), mixed up to $last_b, A after"

step "snapshot of the snapshot starts equal"
dd if="$SNAP1" of=/tmp/S1 bs=1M count=32 iflag=direct 2>/dev/null || fail "reading $SNAP1"
must tctl snapshot p snap1 snap2
expose p snap2 --depth 64
SNAP2=$DEV
must_same "$SNAP2" /tmp/S1 0 $LEN_BYTES "snap2 right after the snapshot"

step "C into snap1's first half and D into snap2's second half, at once"
fio --name=C --filename="$SNAP1" $FIO_DIRECT --iodepth=$QD --rw=randwrite --bs=4k --size=$HALF \
    --verify=pattern --verify_pattern=0xc3%o --do_verify=0 --end_fsync=1 --output=/tmp/C.out &
c_pid=$!
fio --name=D --filename="$SNAP2" $FIO_DIRECT --iodepth=$QD --rw=randwrite --bs=4k \
    --offset=$HALF --size=$HALF --verify=pattern --verify_pattern=0xd4%o --do_verify=0 \
    --end_fsync=1 --output=/tmp/D.out &
d_pid=$!
wait $c_pid || fail "fio C on snap1 failed: $(tail -n 3 /tmp/C.out)"
wait $d_pid || fail "fio D on snap2 failed: $(tail -n 3 /tmp/D.out)"

verify_all() {
    must_same "$ORIGIN" /tmp/B 0 $LEN_BYTES "origin still B ($1)"
    must_same "$SNAP1" /tmp/C 0 $HALF_BYTES "snap1 first half is C ($1)"
    must_same "$SNAP1" /tmp/S1 $HALF_BYTES $HALF_BYTES "snap1 second half unchanged ($1)"
    must_same "$SNAP2" /tmp/S1 0 $HALF_BYTES "snap2 first half unchanged ($1)"
    must_same "$SNAP2" /tmp/D $HALF_BYTES $HALF_BYTES "snap2 second half is D ($1)"
}
step "each thin holds its own writes only"
verify_all live

step "restart the pool; the same bytes; thin_check"
must tctl pool stop p
must thin_check $META
tcheck $META
must tctl pool start p
expose p origin
ORIGIN=$DEV
expose p snap1
SNAP1=$DEV
expose p snap2
SNAP2=$DEV
verify_all "after restart"
must tctl pool stop p
must thin_check $META
pass "snapshot under fio load is a point in time (B below block $first_a, A from block $((last_b + 1))), origin exactly B, snapshot of snapshot and both written independently, same after restart, thin_check clean"
