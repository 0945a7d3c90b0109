# Sourced by every scenario (busybox sh). Results go to ttyS1, one line each, which the host
# reads after the guest powers off:
#   RESULT pass|fail|skip <reason>     the first one counts; the script exits after it
#   FIGURE <name> <value> <unit>       measurements
#   RATIO name=<n> value=<v> goal=<g>  ratios against the kernel's own drivers
# A scenario that exits without a RESULT fails, with the step it was in as the reason.
# Everything else (commands, their output, kernel messages) goes to the console log.

RES=/dev/ttyS1
export THIN_CTL_STATE_DIR=/run/thin/state
export THIN_CTL_RUN_DIR=/run/thin/run
mkdir -p "$THIN_CTL_STATE_DIR" "$THIN_CTL_RUN_DIR"
STEP="start"

# busybox sh runs its own applets before PATH; these want util-linux's and e2fsprogs' tools.
losetup() { /usr/sbin/losetup "$@"; }
blkdiscard() { /usr/sbin/blkdiscard "$@"; }
mke2fs() { /usr/sbin/mke2fs "$@"; }
_RESULTED=""

now() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[$(now)] $*"; }

_result() {
    [ -n "$_RESULTED" ] && return
    _RESULTED=1
    echo "RESULT $*" >$RES
    log "RESULT $*"
}
pass() { _result pass "$*"; exit 0; }
fail() { _result fail "$*"; exit 1; }
skip() { _result skip "$*"; exit 0; }
figure() { echo "FIGURE $*" >$RES; log "FIGURE $*"; }
ratio() { echo "RATIO $*" >$RES; log "RATIO $*"; }

_on_exit() {
    rc=$?
    [ -n "$_RESULTED" ] || _result fail "exited $rc without a result, in step: $STEP"
}
trap _on_exit EXIT

step() { STEP="$*"; log "== $*"; }

# Runs a command; on a non-zero exit the scenario fails, naming the step and the command.
must() {
    log "+ $*"
    "$@" || fail "$STEP: '$*' exited $?"
}

# The same for commands whose exit status is expected to be non-zero.
must_fail() {
    log "+ (must fail) $*"
    if "$@"; then fail "$STEP: '$*' succeeded but should have failed"; fi
}

# thin-ctl with its command echoed to the log.
tctl() {
    log "+ thin-ctl $*"
    thin-ctl "$@"
}

# Echoes one field of `thin-ctl pool status POOL --json` (a number or a quoted string), or
# of the thin THIN in it: jfield POOL KEY [THIN].
jfield() {
    _j=$(thin-ctl pool status "$1" --json) || return 1
    if [ $# -ge 3 ]; then
        _j=$(echo "$_j" | tr '{' '\n' | grep "\"name\":\"$3\"") || return 1
    fi
    echo "$_j" | tr ',' '\n' | sed -n "s/.*\"$2\":*\"\{0,1\}\([^\"}]*\)\"\{0,1\}.*/\1/p" | head -n 1
}

# Fails unless two files or devices hold the same first N bytes: same_bytes A B N.
same_bytes() {
    _a=$(head -c "$3" "$1" | md5sum | cut -d' ' -f1)
    _b=$(head -c "$3" "$2" | md5sum | cut -d' ' -f1)
    [ "$_a" = "$_b" ] || fail "$STEP: $1 and $2 differ in their first $3 bytes"
}

# Creates a file of N MiB of pseudo-random bytes from a seed word: pattern_file FILE SEED MIB.
# Each MiB differs (seed, index), so misplaced blocks show up in a compare.
pattern_file() {
    _f=$1 _s=$2 _n=$3 _i=0
    : >"$_f"
    while [ $_i -lt "$_n" ]; do
        # 1 MiB of printable hash text, unique per (seed, MiB index, 4 KiB line).
        awk -v s="$_s" -v m="$_i" 'BEGIN { srand(s * 4096 + m);
            for (b = 0; b < 256; b++) { l = sprintf("%s:%d:%d:", s, m, b);
              while (length(l) < 4095) l = l sprintf("%08x", int(rand() * 4294967296));
              printf "%s\n", substr(l, 1, 4095) } }' >>"$_f"
        _i=$((_i + 1))
    done
}
