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
        gpu=0,
        mem_mb=resource("plan", "mem_mb"),
        runtime=resource("plan", "runtime"),
    shell:
        "iteralign plan --config {params.config} --output {output} > {log} 2>&1"
