# Sourced by every scenario (busybox sh). Results go to ttyS1, one line each, which the host
# reads after the guest powers off:
#   RESULT pass|fail|skip <reason>     the first one counts; the script exits after it
#   FIGURE name=<n> value=<v> unit=<u>  measurements
#   RATIO name=<n> value=<v> goal=<g>   ours against the kernel's own drivers
# (the benches' format: benches/src/lib.rs). skip exists for the protocol's sake; CI counts
# a skipped scenario as a failure, so no scenario here uses it.
# A scenario that exits without a RESULT fails, with the step it was in as the reason.
# Everything else (commands, their output, kernel messages) goes to the console log.

RES=/dev/ttyS1
export THIN_CTL_STATE_DIR=/run/thin/state
export THIN_CTL_RUN_DIR=/run/thin/run
mkdir -p "$THIN_CTL_STATE_DIR" "$THIN_CTL_RUN_DIR"
STEP="start"

# busybox sh runs its own applets before PATH; these want util-linux's (--show, -z).
losetup() { /usr/sbin/losetup "$@"; }
blkdiscard() { /usr/sbin/blkdiscard "$@"; }
_RESULTED=""
_FAILED=""

now() { cut -d' ' -f1 /proc/uptime; }
# To stderr, so that a log line never ends up in a $(...) capture.
log() { echo "[$(now)] $*" >&2; }

_result() {
    [ -n "$_RESULTED" ] && return
    _RESULTED=1
    echo "RESULT $*" >$RES
    log "RESULT $*"
}
pass() { _result pass "$*"; exit 0; }
fail() { _FAILED=1; _result fail "$*"; exit 1; }
skip() { _result skip "$*"; exit 0; }
figure() { echo "FIGURE $*" >$RES; log "FIGURE $*"; }
ratio() { echo "RATIO $*" >$RES; log "RATIO $*"; }

_on_exit() {
    rc=$?
    [ -n "$_RESULTED" ] || { _FAILED=1; _result fail "exited $rc without a result, in step: $STEP"; }
    if [ -n "$_FAILED" ]; then
        for _l in "$THIN_CTL_RUN_DIR"/*.log; do
            [ -e "$_l" ] || continue
            echo "--- tail of $_l"
            tail -n 40 "$_l"
        done
        echo "--- dmesg tail"
        dmesg | tail -n 30
    fi
}
trap _on_exit EXIT

step() { STEP="$*"; log "== $*"; }

# Runs a command; on a non-zero exit the scenario fails, naming the step and the command.
must() {
    [ "$1" = tctl ] || log "+ $*"
    "$@" || fail "$STEP: '$*' exited $?"
}

# thin-ctl with its command echoed to the log.
tctl() {
    log "+ thin-ctl $*"
    thin-ctl "$@"
}

# thin-ctl check METADATA, its report in the log (no progress bar: stderr is not the console).
tcheck() {
    log "+ thin-ctl check $1"
    thin-ctl check "$1" 2>/tmp/check.err || {
        cat /tmp/check.err
        fail "$STEP: thin-ctl check $1 reports damage"
    }
}

# Echoes one field of `thin-ctl pool status POOL --json` (a number or a quoted string), or
# of the thin THIN in it: jfield POOL KEY [THIN].
jfield() {
    _j=$(thin-ctl pool status "$1" --json) || return 1
    if [ $# -ge 3 ]; then
        _j=$(echo "$_j" | tr '{' '\n' | grep "\"name\":\"$3\"") || return 1
    fi
    echo "$_j" | tr ',' '\n' | sed -n "s/.*\"$2\":\"\{0,1\}\([^\"}]*\)\"\{0,1\}.*/\1/p" | head -n 1
}

# major:minor of a block device, for device-mapper tables: mm /dev/vda.
mm() { cat "/sys/class/block/${1#/dev/}/dev"; }

# Size in bytes of a block device.
dev_bytes() { echo $(($(cat "/sys/class/block/${1#/dev/}/size") * 512)); }

# Waits up to SECS seconds for a command to succeed: wait_until SECS CMD...
wait_until() {
    _t=$1
    shift
    _end=$(($(cut -d. -f1 /proc/uptime) + _t))
    until "$@"; do
        [ "$(cut -d. -f1 /proc/uptime)" -lt $_end ] || return 1
        sleep 0.2
    done
}

# Exposes a thin and sets DEV to its /dev/ublkbN: expose POOL THIN [thin-ctl options].
expose() {
    log "+ thin-ctl expose $*"
    DEV=$(thin-ctl expose "$@") || fail "$STEP: thin-ctl expose $* exited $?"
    [ -b "$DEV" ] || fail "$STEP: thin-ctl expose $* printed '$DEV', not a block device"
    log "  -> $DEV ($(dev_bytes "$DEV") bytes)"
}

# fio with the log's copy of its output; fails the scenario unless it exits 0.
FIO_DIRECT="--ioengine=io_uring --direct=1"
fio_ok() {
    log "+ fio $*"
    fio "$@" --output=/tmp/fio.out
    _rc=$?
    grep -E 'IOPS=|err=|verify|bad magic|crc' /tmp/fio.out
    if [ $_rc -ne 0 ]; then
        tail -n 40 /tmp/fio.out
        fail "$STEP: fio $1 exited $_rc"
    fi
}

# Writes the pattern of byte BYTE (e.g. 0xa1) with each write's offset in it (fio's
# verify_pattern %o; writes of 4 KiB unless the options say --bs), from OFF for LEN bytes,
# sequentially: fio_pattern TARGET BYTE OFF LEN [fio options]. On a block device it writes
# O_DIRECT; on a file in /tmp (a reference copy) buffered. The content depends only on
# (BYTE, offset, bs), so a reference file written the same way compares block for block.
fio_pattern() {
    _tgt=$1 _byte=$2 _off=$3 _len=$4
    shift 4
    if [ -b "$_tgt" ]; then _how="$FIO_DIRECT --iodepth=16"; else _how="--ioengine=psync"; fi
    fio_ok --name="pattern$_byte" --filename="$_tgt" $_how --rw=write --bs=4k \
        --offset="$_off" --size="$_len" --verify=pattern --verify_pattern="$_byte%o" \
        --do_verify=0 "$@"
}

# Reference file for fio_pattern: ref_pattern FILE BYTE OFF LEN (FILE is made sparse first).
ref_pattern() {
    [ -e "$1" ] || truncate -s 0 "$1"
    fio_pattern "$@"
}

# Whether LEN bytes at OFF are equal in A and B: same_range A B OFF LEN. blockcmp, not
# busybox cmp: cmp reads a byte at a time, 3 s for 32 MiB under emulation.
same_range() {
    blockdev --flushbufs "$1" 2>/dev/null
    blockdev --flushbufs "$2" 2>/dev/null
    _bs=4096
    [ $(($3 % 65536)) -eq 0 ] && [ $(($4 % 65536)) -eq 0 ] && _bs=65536
    blockcmp --bs $_bs --offset "$3" --len "$4" "$1" "$2" >/tmp/same_range.runs
}

# Fails unless LEN bytes at OFF are equal in A and B: must_same A B OFF LEN WHAT.
must_same() {
    log "+ compare $1 and $2 at $3 for $4 bytes ($5)"
    same_range "$1" "$2" "$3" "$4" || {
        awk '$1 == 0 { print "  differ: blocks " $2 "+" $3 " of " bs }' bs=$_bs \
            /tmp/same_range.runs | head -n 5
        fail "$STEP: $5: $1 differs from $2 in $3+$4"
    }
}

# A file of zeros (sparse): zeros FILE BYTES.
zeros() { rm -f "$1"; truncate -s "$2" "$1"; }

# The pid of POOL's daemon, from its pid file: daemon_pid POOL.
daemon_pid() { cat "$THIN_CTL_RUN_DIR/$1.pid" 2>/dev/null; }
