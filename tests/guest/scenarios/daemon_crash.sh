# The pool daemon is killed (SIGKILL) while fio writes: the device stays, its requests wait
# (ublk user recovery); `thin-ctl recover` starts a new daemon that reattaches it, the
# driver reissues what was in flight, and fio finishes without an error. Data flushed before
# the kill reads back exactly; every block fio wrote during the crash reads as fio's data or,
# if the write was acknowledged but not yet flushed when the daemon died, as zeros (never
# anything else; the count is printed as a FIGURE). New writes after recovery verify. The
# pool then stops cleanly and both checkers accept its metadata.
# guest-timeout: 300
# guest-disks: 32M 256M
# guest-needs: thin-ctl
. /lib.sh

META=/dev/vda
DATA=/dev/vdb

step "pool, thin, pattern P flushed"
must tctl pool create p --metadata $META --data $DATA
must tctl pool start p
must tctl create p vol --size 128M
expose p vol --depth 64
ref_pattern /tmp/P 0xa1 0 16M
fio_pattern "$DEV" 0xa1 0 16M --end_fsync=1
ref_pattern /tmp/W 0xb2 32M 48M
zeros /tmp/zero 128M

step "fio writes W (48 MiB random 4k, QD16); the daemon is killed under it"
writes0=$(jfield p writes)
log "+ fio W in the background"
fio --name=W --filename="$DEV" $FIO_DIRECT --iodepth=16 --rw=randwrite --bs=4k --offset=32M \
    --size=48M --verify=pattern --verify_pattern=0xb2%o --do_verify=0 --end_fsync=1 \
    --output=/tmp/W.out &
FIO_PID=$!
has_progress() { [ "$(jfield p writes)" -ge $((writes0 + 3000)) ]; }
wait_until 120 has_progress || fail "fio W made no progress in 120 s"
old_pid=$(daemon_pid p)
[ -n "$old_pid" ] || fail "no daemon pid file"
log "+ kill -9 $old_pid (the daemon)"
kill -9 "$old_pid"
gone() { ! kill -0 "$old_pid" 2>/dev/null; }
wait_until 30 gone || fail "the daemon (pid $old_pid) survived SIGKILL for 30 s"
sleep 2
kill -0 $FIO_PID 2>/dev/null || fail "fio W ended while no daemon served it: $(grep -m 2 -E 'err|error' /tmp/W.out)"
log "fio still waiting with the daemon dead: good"

step "thin-ctl recover; fio finishes without an error"
t0=$(now)
must tctl recover p
new_pid=$(daemon_pid p)
[ -n "$new_pid" ] && [ "$new_pid" != "$old_pid" ] || fail "no new daemon after recover"
wait $FIO_PID
rc=$?
t1=$(now)
grep -E 'IOPS|err=' /tmp/W.out
[ $rc -eq 0 ] || fail "fio W exited $rc after recovery: $(grep -m 2 -E 'error' /tmp/W.out)"
log "fio finished $(awk "BEGIN{print $t1-$t0}")s after recover started"

step "data flushed before the kill reads back"
must_same "$DEV" /tmp/P 0 $((16 << 20)) "pattern P, flushed before the kill"

step "every block W wrote is W's data or zeros"
log "+ blockcmp $DEV W zero (1=W 2=zeros 0=neither)"
blockcmp --offset 32M --len 48M "$DEV" /tmp/W /tmp/zero >/tmp/runs
bc_rc=$?
lost=$(awk '$1 == 2 { n += $3 } END { print n + 0 }' /tmp/runs)
awk '$1 != 1' /tmp/runs | head -n 20
[ $bc_rc -eq 0 ] || fail "blocks of W's range hold neither W's data nor zeros after recovery"
figure "name=guest_crash_unflushed_4k_blocks_lost value=$lost unit=blocks"

step "new writes after recovery verify"
fio_ok --name=after --filename="$DEV" $FIO_DIRECT --rw=randwrite --bs=4k --iodepth=16 \
    --offset=96M --size=16M --verify=crc32c --randrepeat=1

step "stop; both checkers accept the metadata"
must tctl pool stop p
tcheck $META
must thin_check $META
pass "daemon killed under fio: recover reattached the device, fio finished clean, flushed data intact, $lost unflushed 4k writes of 12288 lost, new writes verify, thin_check clean"
