#!/bin/bash
# Start a single-node Slurm cluster for scaletrain's tests (munged, slurmctld, slurmd) on this machine, as root.
# Usage: start.sh PID_DIR   (stop it with stop.sh PID_DIR). Installs the Debian packages if missing.
# Seen working: Slurm 22.05 on Debian 12, daemons up in about a second. No accounting: sacct is absent,
# so submitit warns "Bypassing sacct error" and reports state UNKNOWN while results still come back.
set -euo pipefail
pids=${1:?usage: start.sh PID_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$pids"
if ! command -v slurmctld >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
fi
cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
state=$(cd "$pids" && pwd)/state
rm -rf "$state"; mkdir -p "$state/slurmctld" "$state/slurmd"
sed -e "s/@CPUS@/$cpus/" -e "s/@MEM_MB@/$mem_mb/" -e "s#@STATE@#$state#" "$here/slurm.conf.in" > /etc/slurm/slurm.conf
mkdir -p /run/munge
chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { mungekey -c -f; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
# munged refuses to run as root
setsid runuser -u munge -- /usr/sbin/munged -F >"$state/munged.out" 2>&1 </dev/null &
echo $! > "$pids/munged"
for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
setsid /usr/sbin/slurmctld -D -i >"$state/slurmctld.out" 2>&1 </dev/null &
echo $! > "$pids/slurmctld"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
# the machine's hostname is not "localhost": name the node explicitly
setsid /usr/sbin/slurmd -D -N localhost >"$state/slurmd.out" 2>&1 </dev/null &
echo $! > "$pids/slurmd"
for _ in $(seq 100); do sinfo -h -o %t 2>/dev/null | grep -qE '^idle' && break; sleep 0.2; done
sinfo -h -o '%P %a %D %t'
