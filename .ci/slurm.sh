#!/usr/bin/env bash
# A throw-away single-node SLURM (slurmctld + slurmd + slurmdbd on MariaDB, munge auth)
# for tests/test_slurm.py. Everything lives under one state directory: config, keys,
# database, spool, logs and pid files, on private ports, so nothing in /etc is changed
# and `down` stops exactly the daemons `up` started (by their pid files).
#
#   .ci/slurm.sh install          # apt packages (idempotent; needs root)
#   .ci/slurm.sh up STATE_DIR     # configure + start; prints `export SLURM_CONF=...`
#   .ci/slurm.sh down STATE_DIR   # stop what `up` started, remove STATE_DIR
set -euo pipefail
# The daemons (slurmd, slurmctld, munged, mysqld) live in the sbin dirs, which a plain
# user PATH (env -i PATH=/usr/bin:/bin) lacks.
export PATH="$PATH:/usr/sbin:/sbin"

PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
# Private ports: a SLURM or MariaDB already on this host keeps its own.
CTLD_PORT=${KTFLOW_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${KTFLOW_SLURM_SLURMD_PORT:-16818}
DBD_PORT=${KTFLOW_SLURM_DBD_PORT:-16819}
DB_PORT=${KTFLOW_SLURM_DB_PORT:-16306}
CLUSTER=ktflow
DEFAULT_CONF=/etc/slurm/slurm.conf

log() { echo "slurm.sh: $*" >&2; }

install() {
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]}"
    # Package scripts must not start system-wide daemons: `up` runs private ones.
    local policy=/usr/sbin/policy-rc.d created=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [[ $created -eq 1 ]] && rm -f "$policy"
    return 0
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    while ((SECONDS < deadline)); do
        timeout 10 "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    log "timed out waiting for $what"
    return 1
}

write_configs() {
    local s=$1 host=$2 node_line=$3
    mkdir -p "$s/etc" "$s/state" "$s/spool" "$s/log"
    cat >"$s/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$s/state
SlurmdSpoolDir=$s/spool
SlurmctldPidFile=$s/slurmctld.pid
SlurmdPidFile=$s/slurmd.pid
SlurmctldLogFile=$s/log/slurmctld.log
SlurmdLogFile=$s/log/slurmd.log
# No cgroups in a container: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# The executor plugin polls job states with sacct, so accounting goes to slurmdbd.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
MinJobAge=300
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
# The names profiles/slurm routes jobs to: CPU steps and GPU steps.
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
    cat >"$s/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$s/slurmdbd.pid
LogFile=$s/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=ktflow
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$s/etc/slurmdbd.conf"
}

start_munge() {
    local s=$1
    # SLURM's clients (sacctmgr, sacct) always use munge's default socket, whatever
    # AuthInfo says, so a munged already serving it is used as it is.
    if munge -n >/dev/null 2>&1; then
        log "using the munged already running"
        return 0
    fi
    mkdir -p "$s/munge" /run/munge
    chmod 700 "$s/munge"
    dd if=/dev/urandom of="$s/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$s/munge/munge.key"
    # --force: munged refuses to run as root otherwise.
    munged --force --key-file="$s/munge/munge.key" --pid-file="$s/munge/munged.pid" \
        --log-file="$s/log/munged.log" --seed-file="$s/munge/munge.seed"
    wait_for 10 munge munge -n
}

start_mariadb() {
    local s=$1
    if [[ ! -d $s/mysql/mysql ]]; then
        mariadb-install-db --user=root --datadir="$s/mysql" --auth-root-authentication-method=socket \
            --skip-test-db >"$s/log/mariadb-install.log" 2>&1
    fi
    mariadbd --no-defaults --user=root --datadir="$s/mysql" --socket="$s/mysql.sock" \
        --pid-file="$s/mariadb.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
        --log-error="$s/log/mariadb.log" --innodb-buffer-pool-size=64M >>"$s/log/mariadb.log" 2>&1 &
    wait_for 60 mariadb mariadb --no-defaults --socket="$s/mysql.sock" -e "select 1"
    mariadb --no-defaults --socket="$s/mysql.sock" <<'EOF'
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'ktflow';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'ktflow';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

up() {
    local s=$1
    install
    mkdir -p "$s/log"
    s=$(cd "$s" && pwd)
    local host node_line
    host=$(hostname -s)
    # What slurmd itself detects, so the node is never drained for "low memory/CPUs";
    # a little memory is held back for the daemons.
    node_line=$(slurmd -C | head -1 | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^RealMemory=/) {
        split($i, kv, "="); $i = "RealMemory=" int(kv[2] * 0.9) } print}')
    write_configs "$s" "$host" "$node_line"
    export SLURM_CONF=$s/etc/slurm.conf
    # The jobstep plugin drops SLURM_CONF from the environment of the srun it runs
    # inside each job, so srun only finds the config at its default path.
    if [[ -e $DEFAULT_CONF && ! -L $DEFAULT_CONF ]]; then
        log "$DEFAULT_CONF exists (a real SLURM host?); refusing to replace it"
        return 1
    fi
    mkdir -p "$(dirname "$DEFAULT_CONF")"
    ln -sfn "$SLURM_CONF" "$DEFAULT_CONF"
    start_munge "$s"
    start_mariadb "$s"
    slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i add account ktflow cluster="$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i add user "$(id -un)" account=ktflow cluster="$CLUSTER" >/dev/null 2>&1 || true
    slurmctld
    wait_for 60 slurmctld scontrol ping
    slurmd
    wait_for 60 "node $host idle" bash -c "sinfo -h -N -o %t | grep -qx idle"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, wait, then KILL the one process it names
    local file=$1 name=$2 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 80; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && { log "$name ($pid) did not stop; killing"; kill -9 "$pid" || true; }
    fi
    rm -f "$file"
}

down() {
    local s=$1
    [[ -d $s ]] || return 0
    s=$(cd "$s" && pwd)
    if [[ -f $s/etc/slurm.conf ]]; then
        export SLURM_CONF=$s/etc/slurm.conf
        scancel --full --user="$(id -un)" >/dev/null 2>&1 || true
    fi
    stop_pidfile "$s/slurmd.pid" slurmd
    stop_pidfile "$s/slurmctld.pid" slurmctld
    stop_pidfile "$s/slurmdbd.pid" slurmdbd
    stop_pidfile "$s/mariadb.pid" mariadbd
    if [[ -f $s/munge/munged.pid ]]; then
        stop_pidfile "$s/munge/munged.pid" munged
        rmdir /run/munge 2>/dev/null || true
    fi
    [[ $(readlink "$DEFAULT_CONF" 2>/dev/null) == "$s/etc/slurm.conf" ]] && rm -f "$DEFAULT_CONF"
    rm -rf "$s"
}

case ${1:-} in
install) install ;;
up) up "${2:?state directory}" ;;
down) down "${2:?state directory}" ;;
*) echo "usage: $0 install | up STATE_DIR | down STATE_DIR" >&2; exit 2 ;;
esac
