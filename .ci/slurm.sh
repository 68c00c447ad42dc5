#!/usr/bin/env bash
# A real single-host SLURM for the cluster tests: slurmctld and two slurmd (nodes n1 and n2 on 127.0.0.1, so
# that srun -N2 is a real two-node job). Installs Debian's packages where they are missing; needs root.
# The tests marked `slurm` run where `sinfo` answers and skip elsewhere.
set -euo pipefail
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd/n1 /var/spool/slurmd/n2 /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=latentbench
SlurmctldHost=localhost
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
CommunicationParameters=NoInAddrAny
MpiDefault=none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd/%n
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=n1 NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus RealMemory=$mem
NodeName=n2 NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus RealMemory=$mem
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
mkdir -p /run/munge && chown munge:munge /run/munge
[ -f /etc/munge/munge.key ] || { mungekey -c 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
pgrep -x munged >/dev/null || runuser -u munge -- munged
pgrep -x slurmctld >/dev/null || { rm -f /run/slurmctld.pid; slurmctld; }
for node in n1 n2; do
  pgrep -f "slurmd -N $node" >/dev/null || slurmd -N "$node"
done
for _ in $(seq 60); do
  [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ] && { sinfo; exit 0; }
  sleep 1
done
echo "slurm: nodes not idle after 60 s" >&2; sinfo >&2 || true; tail -5 /var/log/slurm/*.log >&2; exit 1
