rule plan:
    input:
        prompt_source_file(),
    output:
        result("prompts.parquet"),
    params:
        config=CONFIG_FILE,
    log:
        log_file("plan.log"),
    benchmark:
        bench_file("plan.tsv")
    threads: resource("plan", "threads")
    resources:
        **job_resources("plan"),
    conda:
        conda_env("plan")
    shell:
        "iteralign plan --config {params.config} --output {output} > {log} 2>&1"
