# A pool runs out of data space. With --error-if-no-space writes fail at once with ENOSPC
# and the pool says out_of_data_space; in the default queue mode writes wait instead. Either
# way `pool grow` (the pools use 8 MiB of 64 MiB data disks) brings the pool back to rw, the
# writes go through (the queued dd finishes by itself), and nothing written before is lost.
# guest-timeout: 300
# guest-disks: 16M 64M 16M 64M
# guest-needs: thin-ctl
. /lib.sh

MIB=1048576

# A pool of 8 MiB (128 blocks, 4 of them the reserve) with a 32 MiB thin holding pattern A
# in its first 4 MiB: small_pool NAME META DATA [options].
small_pool() {
    _n=$1 _m=$2 _d=$3
    shift 3
    must tctl pool create "$_n" --metadata "$_m" --data "$_d" --data-size 8M --reserve-blocks 4 "$@"
    must tctl pool start "$_n"
    must tctl create "$_n" vol --size 32M
    expose "$_n" vol
    fio_pattern "$DEV" 0xa1 0 4M --bs=64k --end_fsync=1
}
mode() { jfield "$1" mode; }
is_rw() { [ "$(mode "$1")" = rw ]; }
ref_pattern /tmp/A 0xa1 0 4M --bs=64k
ref_pattern /tmp/B 0xb2 4M 12M --bs=64k

step "error mode: writes past the space fail with ENOSPC"
small_pool e /dev/vda /dev/vdb --error-if-no-space
E=$DEV
log "+ dd 12 MiB of B at 4 MiB (must fail)"
dd if=/tmp/B of="$E" bs=64k skip=64 seek=64 count=192 oflag=direct 2>/tmp/dd.err
rc=$?
cat /tmp/dd.err
[ $rc -ne 0 ] || fail "12 MiB written into a pool with 4 MiB free: no error"
grep -q 'No space left on device' /tmp/dd.err || fail "dd failed, but not with ENOSPC: $(head -n 1 /tmp/dd.err)"
[ "$(mode e)" = out_of_data_space ] || fail "pool e is in mode $(mode e), not out_of_data_space"
must_same "$E" /tmp/A 0 $((4 * MIB)) "A after ENOSPC"
errors=$(jfield e no_space_errors)
log "no_space_errors: $errors"

step "error mode: grow to 32 MiB; writes go through; nothing lost"
must tctl pool grow e --data-size 32M
# The engine leaves out_of_data_space at its next allocation, not at the grow (the kernel's
# dm-thin switches at the resize): judge the mode after the writes.
must dd if=/tmp/B of="$E" bs=64k skip=64 seek=64 count=192 oflag=direct
wait_until 10 is_rw e || fail "pool e is in mode $(mode e) after grow and writes, not rw"
must_same "$E" /tmp/A 0 $((4 * MIB)) "A after grow"
must_same "$E" /tmp/B $((4 * MIB)) $((12 * MIB)) "B written after grow"

step "queue mode: writes past the space wait"
small_pool q /dev/vdc /dev/vdd --no-space-timeout 120
Q=$DEV
log "+ dd 12 MiB of B at 4 MiB in the background"
dd if=/tmp/B of="$Q" bs=64k skip=64 seek=64 count=192 oflag=direct 2>/tmp/ddq.err &
DD_PID=$!
out_of_space() { [ "$(mode q)" = out_of_data_space ]; }
wait_until 60 out_of_space || fail "pool q never ran out of space (mode $(mode q))"
sleep 3
kill -0 $DD_PID 2>/dev/null || fail "dd ended instead of waiting for space: $(cat /tmp/ddq.err)"
waits=$(jfield q no_space_waits)
log "dd is waiting; no_space_waits: $waits"

step "queue mode: grow; the waiting dd finishes by itself; nothing lost"
must tctl pool grow q --data-size 32M
wait $DD_PID
rc=$?
cat /tmp/ddq.err
[ $rc -eq 0 ] || fail "the queued dd exited $rc after grow"
wait_until 10 is_rw q || fail "pool q is in mode $(mode q) after grow and writes, not rw"
must_same "$Q" /tmp/A 0 $((4 * MIB)) "A in q after grow"
must_same "$Q" /tmp/B $((4 * MIB)) $((12 * MIB)) "B in q, written while it waited"

step "stop both; thin_check"
must tctl pool stop e
must tctl pool stop q
must thin_check /dev/vda
must thin_check /dev/vdc
total=$(jfield e data_blocks_total)
[ "$total" -eq 512 ] || fail "pool e has $total data blocks after it stopped, not the 512 it grew to"
pass "ENOSPC at once in error mode, writes wait in queue mode, pool grow resumes both, A and B intact, thin_check clean"
