"""The ``vtexit`` command line with data-parallel evaluation, for launchers that start several processes:

    torchrun --nproc_per_node 2 -m vtexit.app.parallel evaluate --model default --rows 200 --layer 24
    accelerate launch --num_processes 2 -m vtexit.app.parallel evaluate ...     (add --multi_gpu on GPUs)

Every process loads the model and runs its share of the batches (:mod:`vtexit.evaluation.distributed`); all of
them end with the same merged results, which rank 0 prints and writes. Commands that do not evaluate (calibrate,
bench, flops) would run whole on every process.
"""

from __future__ import annotations

from vtexit.evaluation.distributed import data_parallel


def main() -> None:
    from vtexit.app import cli

    with data_parallel() as ranks:
        if ranks.rank != 0:
            cli.console.quiet = True  # one table, printed by rank 0
        cli.app()


if __name__ == "__main__":
    main()
