#!/bin/bash
# Rendered by `rankmesh submit` from jobscripts/pbs.sh.j2.
#PBS -N rankmesh
#PBS -l select=2:ncpus=4:mpiprocs=4:mem=32gb:ngpus=1
#PBS -l walltime=06:00:00
#PBS -q workq
#PBS -A proj123
#PBS -j oe
#PBS -o /home/alice/project/rankmesh-1700000000-4242.out
#PBS -W umask=077

# The log was created private; what the job writes gets the submitter's umask.
umask 0022
cd /home/alice/project || exit 1
module load openmpi

# PBS sends no warning before the walltime: rankmesh drains by itself at this time
# (300 s before the end) and exits with 75.
export RANKMESH_DRAIN_AT=$(( $(date +%s) + 21600 - 300 ))
# Open MPI refuses to run as root unless told (containers, test machines).
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
mpiexec -n 8 --bind-to none \
  /opt/rankmesh/bin/rankmesh run --python /home/alice/.venv/bin/python3 --scheduler-file /home/alice/.local/state/rankmesh/jobs/"$PBS_JOBID".scheduler /home/alice/project/analysis.py --year '2020 2021'
code=$?
# Rank 0 removes its scheduler file when it ends; not when it was killed.
rm -f /home/alice/.local/state/rankmesh/jobs/"$PBS_JOBID".scheduler
# However the run ended (a rank killed, MPI aborted), nothing of its workers stays on the
# nodes: their /dev/shm and spill folders go, on every node (pbsdsh -u: once per node).
pbsdsh -u /opt/rankmesh/bin/rankmesh sweep || /opt/rankmesh/bin/rankmesh sweep
(umask 077; echo "$code" > /home/alice/.local/state/rankmesh/jobs/"$PBS_JOBID".exit)
exit "$code"
