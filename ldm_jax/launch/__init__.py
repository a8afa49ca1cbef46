"""``ldm-jax launch``: start an ldm-jax command as a job of several processes.

``local`` runs the processes on this machine; ``tpu``, ``gke`` and ``slurm`` create and drive
the job through gcloud, kubectl (or xpk) and sbatch, and print what they would run with
``--dry-run``. Every process runs the same ``ldm-jax`` command; the runtime joins them
(``ldm_jax.parallel.distributed``).
"""
