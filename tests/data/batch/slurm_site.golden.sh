#!/bin/bash
# Rendered by `rankmesh submit` from jobscripts/slurm.sh.j2.
#SBATCH --job-name=rankmesh
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=2
#SBATCH --mem=64G
#SBATCH --gpus-per-node=2
#SBATCH --time=48:00:00
#SBATCH --partition=compute
#SBATCH --account=proj123
#SBATCH --qos=normal
#SBATCH --output=/home/alice/project/logs/run-%j.out
# SIGUSR1 to every task 300 s before the walltime: rankmesh drains the job
# and exits with 75 instead of being killed mid-write.
#SBATCH --signal=USR1@300

# The log was created private; what the job writes gets the submitter's umask.
umask 0022
cd /home/alice/project || exit 1
module load gcc/12
module load openmpi/4.1.5
source /home/alice/venvs/rankmesh/bin/activate
export OMP_NUM_THREADS=2
ulimit -n 8192

srun --kill-on-bad-exit=1 --mpi=pmix --cpu-bind=none \
  /opt/rankmesh/bin/rankmesh run --python python3 --scheduler-file /home/alice/.local/state/rankmesh/jobs/"$SLURM_JOB_ID".scheduler /home/alice/project/analysis.py --year '2020 2021'
code=$?
# Rank 0 removes its scheduler file when it ends; not when it was killed.
rm -f /home/alice/.local/state/rankmesh/jobs/"$SLURM_JOB_ID".scheduler
# However the run ended (a rank killed, MPI aborted), nothing of its workers stays on the
# nodes: their /dev/shm and spill folders go, on every node.
srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 /opt/rankmesh/bin/rankmesh sweep || true
(umask 077; echo "$code" > /home/alice/.local/state/rankmesh/jobs/"$SLURM_JOB_ID".exit)
exit "$code"
