rule sample:
    input:
        prompts=result("prompts.parquet"),
        checkpoint=previous_checkpoint,
    output:
        result("samples_r{n}.parquet"),
    params:
        iteralign=iteralign_command("sample"),
        config=CONFIG_FILE,
    log:
        log_file("sample_r{n}.log"),
    benchmark:
        bench_file("sample_r{n}.tsv")
    wildcard_constraints:
        n=r"[1-9]\d*",
    threads: resource("sample", "threads")
    resources:
        **job_resources("sample"),
    conda:
        conda_env("sample")
    shell:
        "{params.iteralign} sample --config {params.config} --round {wildcards.n} --prompts {input.prompts} "
        "--checkpoint {input.checkpoint} --output {output} --threads {threads} > {log} 2>&1"
