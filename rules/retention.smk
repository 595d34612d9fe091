# checkpoints.keep_last: K deletes round n's policy checkpoint once no job reads it
# any more: round n was evaluated (eval_r{n}) and round n+K finished training
# (train_r{n+K}.jsonl, written after its checkpoint), and under sampling.lag the round
# that samples from it has its samples. The checkpoint itself is a
# param, not an input: a deleted checkpoint must not look like a missing input.
# Only the existence of train_r{n+K}.jsonl matters (ancient): re-training a later
# round does not prune again.
if config["checkpoints"]["keep_last"]:

    rule prune_checkpoint:
        input:
            evaluation=result(layout.eval_summary("{n}")),
            trained=ancient(later_training_metrics),
            sampled=ancient(lagged_readers),
        output:
            result(layout.pruned_record("{n}")),
        params:
            config=CONFIG_FILE,
            checkpoint=round_checkpoint,
        log:
            log_file("prune_checkpoint", "{n}"),
        benchmark:
            bench_file("prune_checkpoint", "{n}")
        wildcard_constraints:
            n=r"[1-9]\d*",
        localrule: True
        conda:
            conda_env("prune_checkpoint")
        shell:
            "iteralign prune --config {params.config} --round {wildcards.n} --checkpoint {params.checkpoint} "
            "--output {output} > {log} 2>&1"
