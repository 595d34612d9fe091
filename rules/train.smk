# Round n starts from ckpt_r{n-1}: weights, optimizer and scheduler state. It trains on
# this round's feedback, or several rounds' (training.history), with their reference
# tables (none for reference-free losses). With training.lora it also reads ckpt_r0/FINAL,
# the base under the adapter.
rule train:
    input:
        feedback=train_feedback,
        reference=train_reference,
        checkpoint=previous_checkpoint,
        base=lora_base,
        old_policy=old_policy_table,
    output:
        checkpoint=directory(checkpoint_dir("{n}")),
        metrics=result(layout.training_metrics("{n}")),
    params:
        config=CONFIG_FILE,
        launch=launcher("train"),
        rebuilds=pruned_checkpoint_note,
        extra_inputs=input_options("reference", "base", "old_policy"),
    message:
        "{params.rebuilds}"  # empty (Snakemake's usual job lines) unless it rebuilds a pruned checkpoint
    log:
        log_file("train", "{n}"),
    benchmark:
        bench_file("train", "{n}")
    wildcard_constraints:
        n=r"[1-9]\d*",
    threads: resource("train", "threads")
    resources:
        **job_resources("train"),
    conda:
        conda_env("train")
    shell:
        "{params.launch} train --config {params.config} --round {wildcards.n} --feedback {input.feedback} "
        "{params.extra_inputs} --checkpoint {input.checkpoint} --output {output.checkpoint} "
        "--metrics {output.metrics} --threads {threads} > {log} 2>&1"
