#!/bin/sh
# Fails if a process the end-to-end tests started outlived them: a Kafka
# broker (tansu), or a process running in or on a directory under the
# tests' temp dirs, ${TMPDIR:-/tmp}/outbox-tests-<pid> (PostgreSQL servers
# and their backends, cluster sentinels, pg_regress).
#
#   leftovers.sh                 every such process on the machine
#   leftovers.sh --run ID        only those of the test run started with
#                                OUTBOX_TESTS_RUN=ID in its environment
#                                (`make e2e` does), so that other checkouts'
#                                runs on the same machine do not count
#                                (PostgreSQL backends overwrite their
#                                environment with their process title: the
#                                postmaster, marked, stands for its server)
#
# Processes get up to $OUTBOX_LEFTOVER_GRACE seconds (default 10) to end.
# Run as root (or as the user that ran the tests) to see every process.
set -u

run=""
if [ "${1:-}" = "--run" ]; then
    run=${2:?--run needs the run id}
fi
tests_dir="${TMPDIR:-/tmp}"
tests_dir="${tests_dir%/}/outbox-tests-"
grace=${OUTBOX_LEFTOVER_GRACE:-10}

# One line per leftover: pid, why, command line.
leftovers() {
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        [ "$pid" = "$$" ] && continue
        comm=$(cat "$proc/comm" 2>/dev/null) || continue
        args=$(tr '\0' ' ' 2>/dev/null <"$proc/cmdline") || continue
        cwd=$(readlink "$proc/cwd" 2>/dev/null)
        why=""
        case "$comm" in
            tansu) why="a Kafka broker" ;;
        esac
        case "$cwd" in
            "$tests_dir"*) why="running in ${cwd%% *}" ;;
        esac
        case "$args" in
            *"$tests_dir"*) why=${why:-"started on a tests' directory"} ;;
        esac
        [ -n "$why" ] || continue
        if [ -n "$run" ]; then
            tr '\0' '\n' 2>/dev/null <"$proc/environ" | grep -qx "OUTBOX_TESTS_RUN=$run" || continue
        fi
        echo "  $pid ($why): $args"
    done
}

waited=0
while :; do
    found=$(leftovers)
    [ -z "$found" ] && break
    if [ "$waited" -ge "$grace" ]; then
        echo "leftovers.sh: processes outlived the tests${run:+ (run $run)}:" >&2
        echo "$found" >&2
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
echo "leftovers.sh: nothing the tests started is running${run:+ (run $run)}"
