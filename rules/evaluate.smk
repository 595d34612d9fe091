# Same held-out prompts and decoding every round (round 0 = the SFT model).
rule evaluate:
    input:
        prompts=result("prompts.parquet"),
        checkpoint=round_checkpoint,
        reference=checkpoint_dir(0),
        baseline=eval_baseline,
    output:
        table=result("eval_r{n}.parquet"),
        summary=result("eval_r{n}.json"),
    params:
        config=CONFIG_FILE,
        baseline=baseline_option,
    log:
        log_file("evaluate_r{n}.log"),
    benchmark:
        bench_file("evaluate_r{n}.tsv")
    threads: resource("evaluate", "threads")
    resources:
        **job_resources("evaluate"),
    conda:
        conda_env("evaluate")
    shell:
        "iteralign evaluate --config {params.config} --round {wildcards.n} --prompts {input.prompts} "
        "--checkpoint {input.checkpoint} --reference-checkpoint {input.reference} {params.baseline} "
        "--table {output.table} --summary {output.summary} --threads {threads} > {log} 2>&1"
