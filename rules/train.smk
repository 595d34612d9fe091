# Round n starts from ckpt_r{n-1}: weights, optimizer and scheduler state.
rule train:
    input:
        feedback=result("feedback_r{n}.json"),
        reference=result("reflogps_r{n}.parquet"),
        checkpoint=previous_checkpoint,
    output:
        checkpoint=directory(checkpoint_dir("{n}")),
        metrics=result("train_r{n}.jsonl"),
    params:
        config=CONFIG_FILE,
        launch=launcher("train"),
    log:
        log_file("train_r{n}.log"),
    benchmark:
        bench_file("train_r{n}.tsv")
    wildcard_constraints:
        n=r"[1-9]\d*",
    threads: resource("train", "threads")
    resources:
        **job_resources("train"),
    conda:
        conda_env("train")
    shell:
        "{params.launch} train --config {params.config} --round {wildcards.n} --feedback {input.feedback} "
        "--reference {input.reference} --checkpoint {input.checkpoint} --output {output.checkpoint} "
        "--metrics {output.metrics} --threads {threads} > {log} 2>&1"
