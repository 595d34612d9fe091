# The SFT model scores this round's feedback once, in its own job, so that the
# train job never holds a reference model in memory.
rule reference:
    input:
        feedback=result("feedback_r{n}.json"),
        checkpoint=checkpoint_dir(0),
    output:
        result("reflogps_r{n}.parquet"),
    params:
        config=CONFIG_FILE,
        launch=launcher("reference"),
    log:
        log_file("reference_r{n}.log"),
    benchmark:
        bench_file("reference_r{n}.tsv")
    wildcard_constraints:
        n=r"[1-9]\d*",
    threads: resource("reference", "threads")
    resources:
        **job_resources("reference"),
    conda:
        conda_env("reference")
    shell:
        "{params.launch} reference --config {params.config} --round {wildcards.n} --feedback {input.feedback} "
        "--checkpoint {input.checkpoint} --output {output} --threads {threads} > {log} 2>&1"
