#!/bin/bash
# Rendered by `rankmesh submit` from jobscripts/slurm.sh.j2.
#SBATCH --job-name=climatology
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --time=04:00:00
#SBATCH --output=/home/alice/project/climatology-%j.out
# SIGUSR1 to every task 600 s before the walltime: rankmesh drains the job
# and exits with 75 instead of being killed mid-write.
#SBATCH --signal=USR1@600

# The log was created private; what the job writes gets the submitter's umask.
umask 0022
cd /home/alice/project || exit 1
eval "$(conda shell.bash hook)"
conda activate pangeo

srun --kill-on-bad-exit=1 --mpi=pmi2 --cpu-bind=none \
  /opt/rankmesh/bin/rankmesh run --python python3 --scheduler-file /home/alice/.local/state/rankmesh/jobs/"$SLURM_JOB_ID".scheduler /home/alice/project/analysis.py --year '2020 2021'
code=$?
# Rank 0 removes its scheduler file when it ends; not when it was killed.
rm -f /home/alice/.local/state/rankmesh/jobs/"$SLURM_JOB_ID".scheduler
# However the run ended (a rank killed, MPI aborted), nothing of its workers stays on the
# nodes: their /dev/shm and spill folders go, on every node.
srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 /opt/rankmesh/bin/rankmesh sweep || true
(umask 077; echo "$code" > /home/alice/.local/state/rankmesh/jobs/"$SLURM_JOB_ID".exit)
exit "$code"
